"""Router health metrics equal an independent computation from the router logits, padding excluded."""

import torch
from test_sft import CONVERSATION, OTHER, batch_of, make_trainer


def independent_stats(model, batch):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    real = batch["attention_mask"].reshape(-1).bool()
    rows = []
    for layer in out.router_logits:
        chosen = layer[real].topk(2, dim=-1).indices.reshape(-1)
        rows.append(torch.bincount(chosen, minlength=layer.shape[-1]).double())
    counts = torch.stack(rows)
    mean = counts.mean(-1)
    return counts / counts.sum(-1, keepdim=True), counts.std(-1, unbiased=False) / mean, counts.max(-1).values / mean - 1


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
        stats[pad_to] = trainer.router_loss.router_stats("eval")
        share, cv, maxvio = independent_stats(model, batch)
        torch.testing.assert_close(stats[pad_to]["share"], share)
        torch.testing.assert_close(stats[pad_to]["cv"], cv)
        torch.testing.assert_close(stats[pad_to]["maxvio"], maxvio)
    assert stats[None]["maxvio"][0] > 0.5  # the skew shows
    assert stats[None]["share"][0].argmax() == 2
    for key in ("share", "cv", "maxvio", "entropy", "dead"):
        torch.testing.assert_close(stats[None][key], stats[48][key])
