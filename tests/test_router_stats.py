"""Router health metrics equal an independent computation from the router logits, padding excluded."""

import torch

from helpers import CONVERSATION, OTHER, batch_of, independent_stats, make_trainer


def test_reported_balance_matches_router_logits_and_ignores_padding(tiny_model_dir, tmp_path):
    _, trainer, encoder = make_trainer(tiny_model_dir, tmp_path)
    model = trainer.model.eval()
    # Skew layer 0's router: point expert 2's row along the mean hidden state it sees, so it wins most tokens.
    gate = model.base_model.model.model.layers[0].mlp.gate
    seen = []
    handle = gate.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=batch_of(encoder, CONVERSATION, OTHER)["input_ids"])
    handle.remove()
    direction = seen[0].reshape(-1, seen[0].shape[-1]).mean(0)
    with torch.no_grad():
        router = [p for n, p in model.named_parameters() if n.endswith("layers.0.mlp.gate.modules_to_save.default.weight")][0]
        router[2] = direction / direction.norm() * 50
    stats = {}
    for pad_to in (None, 48):
        batch = batch_of(encoder, CONVERSATION, OTHER, pad_to=pad_to)
        with torch.no_grad():
            trainer.compute_loss(model, dict(batch))
        stats[pad_to] = trainer.router_terms.router_stats("eval")
        share, cv, maxvio = independent_stats(model, batch)
        torch.testing.assert_close(stats[pad_to]["share"], share)
        torch.testing.assert_close(stats[pad_to]["cv"], cv)
        torch.testing.assert_close(stats[pad_to]["maxvio"], maxvio)
    assert stats[None]["maxvio"][0] > 0.5  # the skew shows
    assert stats[None]["share"][0].argmax() == 2
    for key in ("share", "cv", "maxvio", "entropy", "dead"):
        torch.testing.assert_close(stats[None][key], stats[48][key])
