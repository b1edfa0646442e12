"""CandidateScorer against a slow per-sequence reference on a tiny Llama with an in-test BPE tokenizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from l2zo.errors import L2ZOError
from l2zo.models import set_attn_implementation
from l2zo.tasks import CandidateScorer, Example, ScoringBatch
from tests.conftest import build_tiny_tokenizer

EXAMPLES = [
    Example("a gripping film . It was", (" terrible", " great"), 1),
    Example("Suppose the premise. Can we infer that the claim? Yes, No, or Maybe?\n", ("Yes", "No", "Maybe"), 2),
    Example("The man turned on the faucet so", (" the toilet filled with water.", " water flowed from the spout."), 1),
    Example("dull", (" terrible", " great"), 0),
]


def _reference(model, tokenizer, prompt: str, candidate: str, max_length: int = 10_000) -> float:
    """Mean log-prob of the candidate tokens, one unpadded sequence at a time (BOS + prompt + candidate)."""
    bos = [tokenizer.bos_token_id]
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(candidate, add_special_tokens=False)["input_ids"]
    keep = max_length - 1 - len(c)
    ids = bos + (p[-keep:] if len(p) > keep else p) + c
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    start = len(ids) - len(c)
    return sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids))) / len(c)


def test_collate_layout(tiny_tokenizer) -> None:
    scorer = CandidateScorer(tiny_tokenizer)
    batch = scorer.collate(EXAMPLES)
    n = sum(len(e.candidates) for e in EXAMPLES)
    assert batch.input_ids.shape[0] == n and batch.option_mask.shape == batch.input_ids.shape
    assert batch.example_index.tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3]
    assert batch.candidate_index.tolist() == [0, 1, 0, 1, 2, 0, 1, 0, 1]
    assert batch.labels.tolist() == [1, 2, 1, 0] and batch.num_candidates.tolist() == [2, 3, 2, 2]
    assert batch.option_mask.dtype == torch.float32 and batch.input_ids.dtype == torch.long
    pad = tiny_tokenizer.pad_token_id
    for row, (b, c) in enumerate(zip(batch.example_index.tolist(), batch.candidate_index.tolist(), strict=True)):
        ex = EXAMPLES[b]
        t = batch.input_ids.shape[1]
        pad_len = t - int(batch.attention_mask[row].sum())
        assert batch.attention_mask[row, pad_len:].all() and not batch.attention_mask[row, :pad_len].any()
        assert (batch.input_ids[row, :pad_len] == pad).all()  # left padding: every sequence ends at column T-1
        assert batch.input_ids[row, pad_len] == tiny_tokenizer.bos_token_id
        cand = tiny_tokenizer(ex.candidates[c], add_special_tokens=False)["input_ids"]
        prompt = tiny_tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        assert batch.input_ids[row, pad_len:].tolist() == [tiny_tokenizer.bos_token_id] + prompt + cand
        # option_mask[t] marks positions whose NEXT token is a candidate token.
        targets = batch.input_ids[row, 1:][batch.option_mask[row, :-1].bool()]
        assert targets.tolist() == cand and batch.option_mask[row, -1] == 0


def test_candidate_scores_match_slow_reference(tiny_lm, tiny_tokenizer) -> None:
    scorer = CandidateScorer(tiny_tokenizer)
    with torch.no_grad():
        scores = scorer.candidate_scores(tiny_lm, scorer.collate(EXAMPLES))
    assert scores.shape == (4, 3) and scores.dtype == torch.float32
    for b, ex in enumerate(EXAMPLES):
        for c, cand in enumerate(ex.candidates):
            assert scores[b, c].item() == pytest.approx(_reference(tiny_lm, tiny_tokenizer, ex.prompt, cand), abs=1e-5)
        assert (scores[b, len(ex.candidates) :] == float("-inf")).all()


class _FullLogitsOnly(torch.nn.Module):
    """The same Llama behind a forward that takes neither position_ids nor logits_to_keep."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padding_with_logits_only_at_candidates_matches_reference_per_kernel(
    tiny_lm, tiny_tokenizer, attn
) -> None:
    """Left padding + explicit positions + the LM head on the last columns only, under both attention kernels
    (a fully masked pad row must not leak NaN into real rows), equals unpadded scoring; the lm loss too."""
    before = tiny_lm.config._attn_implementation
    set_attn_implementation(tiny_lm, attn)
    try:
        scorer = CandidateScorer(tiny_tokenizer)
        batch = scorer.collate(EXAMPLES)
        calls = []
        hook = tiny_lm.lm_head.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
        with torch.no_grad():
            scores = scorer.candidate_scores(tiny_lm, batch)
            lm = scorer.loss(tiny_lm, batch, "lm")
        hook.remove()
        longest_cand = max(
            len(tiny_tokenizer(c, add_special_tokens=False)["input_ids"]) for e in EXAMPLES for c in e.candidates
        )
        assert calls[0][1] == longest_cand < batch.input_ids.shape[1]  # not [N, T, V]; the last column is never run
        for b, ex in enumerate(EXAMPLES):
            for c, cand in enumerate(ex.candidates):
                assert scores[b, c].item() == pytest.approx(
                    _reference(tiny_lm, tiny_tokenizer, ex.prompt, cand), abs=1e-5
                )
        with torch.no_grad():
            single = scorer.collate([Example("a gripping film . It was", (" great",), 0)])  # one row: no padding
            full = scorer.candidate_scores(_FullLogitsOnly(tiny_lm), single)
            kept = scorer.candidate_scores(tiny_lm, single)
        torch.testing.assert_close(full, kept, atol=1e-5, rtol=0)
        assert torch.isfinite(lm)
    finally:
        set_attn_implementation(tiny_lm, before)


def test_sequences_that_differ_only_in_their_last_token_run_once(tiny_lm, tiny_tokenizer) -> None:
    """Single-token candidates: the C sequences of an example are one forward row (the prompt), and the scores
    and losses are those of the unmerged reference; multi-token candidates keep one row each."""
    single = ("x", "y", "z")  # one byte each: one token each in the byte-level BPE
    assert all(len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) == 1 for t in single)
    examples = [Example("a gripping film . It was", single, 1), Example("dull", single[:2], 0)]
    scorer = CandidateScorer(tiny_tokenizer)
    rows = []
    hook = tiny_lm.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            scores = scorer.candidate_scores(tiny_lm, scorer.collate(examples))
            mixed = scorer.candidate_scores(tiny_lm, scorer.collate(EXAMPLES))
    finally:
        hook.remove()
    assert rows[0] == len(examples)  # one row per example, not one per candidate
    assert rows[1] < sum(len(e.candidates) for e in EXAMPLES)  # only identical rows merge
    for batch_examples, got in ((examples, scores), (EXAMPLES, mixed)):
        for b, ex in enumerate(batch_examples):
            for c, cand in enumerate(ex.candidates):
                ref = _reference(tiny_lm, tiny_tokenizer, ex.prompt, cand)
                assert got[b, c].item() == pytest.approx(ref, abs=1e-5)


def test_unique_rows_keeps_first_seen_order_and_maps_every_row() -> None:
    from l2zo.tasks.scoring import _unique_rows

    ids = torch.tensor([[5, 6], [1, 2], [5, 6], [1, 2], [0, 9]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 1], [1, 1]])  # row 3 is row 1 with a pad: not the same row
    u_ids, u_mask, row_of = _unique_rows(ids, mask)
    assert u_ids.tolist() == [[5, 6], [1, 2], [1, 2], [0, 9]] and u_mask[2].tolist() == [0, 1]
    assert row_of.tolist() == [0, 1, 0, 2, 3]
    torch.testing.assert_close(u_ids[row_of], ids)
    same, _, identity = _unique_rows(ids[:2], mask[:2])
    assert same is ids[:2] or torch.equal(same, ids[:2])
    assert identity.tolist() == [0, 1]


def test_a_forward_without_position_ids_is_refused_on_padded_batches(tiny_lm, tiny_tokenizer) -> None:
    scorer = CandidateScorer(tiny_tokenizer)
    with pytest.raises(L2ZOError, match="position_ids"), torch.no_grad():
        scorer.candidate_scores(_FullLogitsOnly(tiny_lm), scorer.collate(EXAMPLES))


def test_left_truncation_keeps_bos_prompt_end_and_candidate(tiny_lm, tiny_tokenizer) -> None:
    max_length = 12
    scorer = CandidateScorer(tiny_tokenizer, max_length=max_length)
    ex = Example("a gripping film . It was " * 5 + "It was", (" terrible", " great"), 1)
    batch = scorer.collate([ex])
    assert batch.input_ids.shape[1] <= max_length
    prompt = tiny_tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    for row, cand in enumerate(ex.candidates):
        c = tiny_tokenizer(cand, add_special_tokens=False)["input_ids"]
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        assert len(ids) == max_length and ids[0] == tiny_tokenizer.bos_token_id
        assert ids[1:] == prompt[-(max_length - 1 - len(c)) :] + c
    with torch.no_grad():
        scores = scorer.candidate_scores(tiny_lm, batch)
    for c, cand in enumerate(ex.candidates):
        ref = _reference(tiny_lm, tiny_tokenizer, ex.prompt, cand, max_length=max_length)
        assert scores[0, c].item() == pytest.approx(ref, abs=1e-5)
    with pytest.raises(L2ZOError, match="does not fit max_length"):
        CandidateScorer(tiny_tokenizer, max_length=3).collate([Example("x", (" the toilet filled with water.",), 0)])


def test_trailing_eos_is_dropped_and_pad_falls_back_to_eos() -> None:
    tok = build_tiny_tokenizer(add_eos=True, with_pad=False)
    scorer = CandidateScorer(tok)
    assert scorer.prefix == [tok.bos_token_id] and scorer.pad_token_id == tok.eos_token_id
    batch = scorer.collate(EXAMPLES[:1])
    real = batch.input_ids[batch.attention_mask.bool()]
    assert tok.eos_token_id not in real.tolist()


def test_losses(tiny_lm, tiny_tokenizer) -> None:
    scorer = CandidateScorer(tiny_tokenizer)
    batch = scorer.collate(EXAMPLES)
    with torch.no_grad():
        scores = scorer.candidate_scores(tiny_lm, batch)
        cls = scorer.loss(tiny_lm, batch, "classification")
        lm = scorer.loss(tiny_lm, batch, "lm")
        metrics = scorer.evaluate(tiny_lm, batch)
    assert cls.dtype == torch.float32 and cls.dim() == 0 and torch.isfinite(cls)
    assert cls.item() == pytest.approx(F.cross_entropy(scores, batch.labels).item(), abs=1e-6)
    # "lm": token-level mean NLL over the correct candidates' tokens (MeZO's COPA loss).
    total, count = 0.0, 0
    for ex in EXAMPLES:
        cand = ex.candidates[ex.label]
        n = len(tiny_tokenizer(cand, add_special_tokens=False)["input_ids"])
        total += -_reference(tiny_lm, tiny_tokenizer, ex.prompt, cand) * n
        count += n
    assert lm.dtype == torch.float32 and lm.item() == pytest.approx(total / count, abs=1e-5)
    assert set(metrics) == {"loss_sum", "correct", "count"}
    assert metrics["loss_sum"].item() == pytest.approx(4 * cls.item(), abs=1e-5)
    assert metrics["correct"].item() == int((scores.argmax(-1) == batch.labels).sum()) and metrics["count"].item() == 4
    with pytest.raises(L2ZOError, match="unknown loss kind"):
        scorer.loss(tiny_lm, batch, "mse")


def test_bf16_autocast_scores_are_fp32(tiny_lm, tiny_tokenizer) -> None:
    scorer = CandidateScorer(tiny_tokenizer)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = scorer.candidate_scores(tiny_lm, scorer.collate(EXAMPLES))
    assert scores.dtype == torch.float32 and torch.isfinite(scores[scores > float("-inf")]).all()


def test_collate_as_dataloader_collate_fn_and_to(tiny_tokenizer) -> None:
    scorer = CandidateScorer(tiny_tokenizer)
    loader = torch.utils.data.DataLoader(EXAMPLES, batch_size=3, collate_fn=scorer.collate)
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 1] and isinstance(batches[0], ScoringBatch)
    moved = batches[0].to("cpu")
    assert moved is not batches[0] and torch.equal(moved.input_ids, batches[0].input_ids)


def test_each_distinct_text_is_tokenized_once(tiny_tokenizer) -> None:
    calls: list[list[str]] = []

    class Counting:
        def __init__(self, tok):
            self.tok = tok
            self.pad_token_id, self.eos_token_id = tok.pad_token_id, tok.eos_token_id

        def __call__(self, texts, **kwargs):
            calls.append(list(texts) if isinstance(texts, list) else [texts])
            return self.tok(texts, **kwargs)

    scorer = CandidateScorer(Counting(tiny_tokenizer))
    calls.clear()
    scorer.collate(EXAMPLES + EXAMPLES)
    tokenized = [t for c in calls for t in c]
    assert len(tokenized) == len(set(tokenized))  # prompts and shared candidates (" great") once each
    calls.clear()
    scorer.collate(EXAMPLES)
    assert calls == []  # cached across batches
