"""The LM head scores trained positions a chunk at a time (finetune/lm_head.py): the same losses, log-probs
and gradients as full logits, and nothing of sequence x vocabulary size kept for backward."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import MixtralForCausalLM

from finetune.model.lm_head import TokenLogProbs, use_compact_lm_head
from finetune.model.tiny import tiny_config

VOCAB = 32000


def tiny_model(head_trains: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_config(vocab_size=VOCAB)).float()
    if head_trains:  # full fine-tuning: every weight, the LM head included
        return model
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    return get_peft_model(model, config)


def batch(seed: int = 1, rows: int = 3, length: int = 40):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 30:] = 0  # a padded row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :12] = -100  # a prompt that is not trained
    return input_ids, attention_mask, labels


def reference(model, input_ids, attention_mask, labels):
    """Per-token log-probs from the model's own full logits, and the mean loss over trained tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    log_p = torch.log_softmax(logits, -1)
    log_probs = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(log_p.exp() * log_p).sum(-1) * mask
    return log_probs, entropy, -log_probs.sum() / mask.sum()


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("head_trains", [False, True], ids=["lora-frozen-head", "full-trained-head"])
def test_chunked_head_equals_full_logits_in_loss_log_probs_and_gradients(head_trains):
    model = tiny_model(head_trains)
    input_ids, attention_mask, labels = batch()
    log_probs, entropy, loss = reference(model, input_ids, attention_mask, labels)
    loss.backward()
    expected = gradients(model)
    model.zero_grad()

    assert use_compact_lm_head(model)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    causal_lm._trained_positions_head.chunk_rows = 7  # 3 x 28 trained positions -> 12 chunks, one partial
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(out.log_probs, log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    got = gradients(model)
    assert got.keys() == expected.keys() and len(got) >= (20 if head_trains else 12)
    if head_trains:
        assert "lm_head.weight" in got
    for name, grad in expected.items():
        scale = grad.abs().max().clamp(min=1e-12)
        assert (got[name] - grad).abs().max() / scale < 1e-5, name


def test_scoring_in_chunks_changes_nothing_but_memory():
    """The same fields and input gradients for 1, 5 and all rows per chunk."""
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(VOCAB, 16)
    targets = torch.randint(0, VOCAB, (23,))
    results = []
    for chunk in (1, 5, 1000):
        out = TokenLogProbs.apply(hidden, weight, None, targets, chunk, True)
        (grad,) = torch.autograd.grad(out[:, 0].sum(), hidden)
        results.append((out.detach(), grad))
    for out, grad in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-5)
        # The input gradient is (onehot - p) @ W over the chunk's rows: fp32 matmuls over 1, 5 or 23 rows block
        # their sums differently (measured here: 4.7e-5 apart on values of order 1).
        torch.testing.assert_close(grad, results[0][1], rtol=1e-4, atol=1e-4)
    full = torch.log_softmax(hidden.detach() @ weight.t(), -1)
    torch.testing.assert_close(results[0][0][:, 0], full.gather(1, targets[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0][0][:, 4].bool(), full.argmax(-1) == targets)


@pytest.mark.parametrize("head_trains", [False, True], ids=["lora-frozen-head", "full-trained-head"])
def test_backward_keeps_nothing_of_positions_x_vocabulary(head_trains):
    """What forward saves for backward is at most hidden-sized per position: no logits, whatever the length."""
    model = tiny_model(head_trains)
    use_compact_lm_head(model)
    input_ids, attention_mask, labels = batch(length=200)
    trained = int((labels[:, 1:] != -100).sum())
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True).loss.backward()
    # The LM head weight itself (vocab x hidden) is saved by reference when it trains; nothing else that large.
    head = VOCAB * 64
    assert max(n for n in saved if n != head) < trained * VOCAB / 8


def test_no_gradient_state_without_grad():
    """Evaluation and TRL's reference pass run under no_grad: nothing is kept for a backward that never comes."""
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(100, 16)
    targets = torch.randint(0, 100, (9,))
    with torch.no_grad():
        out = TokenLogProbs.apply(hidden, weight, None, targets, 4, torch.is_grad_enabled())
    assert out.grad_fn is None and not out.requires_grad
    assert math.isfinite(float(out[:, 0].sum()))


@pytest.mark.gpu
@pytest.mark.parametrize("head_trains", [False, True], ids=["lora-frozen-head", "full-trained-head"])
def test_on_cuda_our_head_equals_trls_triton_head(head_trains, monkeypatch):
    """On CUDA the trainers keep TRL's Triton head; where Triton is absent ours runs. Both must agree."""
    from trl.trainer.utils import add_fused_lm_head

    import finetune.model.lm_head as lm_head

    input_ids, attention_mask, labels = (t.cuda() for t in batch())
    results = {}
    for ours in (False, True):
        model = tiny_model(head_trains).cuda()
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        add_fused_lm_head(causal_lm, outputs=("log_probs", "entropy"))  # as TRL's trainers do
        if ours:  # ours where TRL's Triton head would run
            monkeypatch.setattr(lm_head, "has_triton", lambda device: False)
        assert use_compact_lm_head(model) is ours
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        results[ours] = (out, gradients(model))
    (trl_out, trl_grads), (our_out, our_grads) = results[False], results[True]
    torch.testing.assert_close(our_out.loss, trl_out.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(our_out.log_probs, trl_out.log_probs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_out.entropy, trl_out.entropy, rtol=1e-4, atol=1e-4)
    assert our_grads.keys() == trl_grads.keys()
    for name, grad in trl_grads.items():
        assert ((our_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)).item() < 1e-3, name
