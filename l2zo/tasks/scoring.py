"""Candidate scoring shared by every task: batching, MeZO's classification loss, the LM loss, accuracy.

Each example becomes one sequence per candidate, ``[special prefix] + prompt tokens + candidate tokens``, LEFT
padded. The prompt and the candidate are tokenized separately (the prompt with the tokenizer's leading special
tokens, e.g. BOS; trailing ones such as an EOS are dropped since the candidate follows), so the candidate's tokens
are known exactly. A candidate's score is the mean log-probability of its tokens given everything before them
(MeZO's length-normalised score).

Why left padding: every sequence then ends at column T-1, so all candidate tokens sit in the last few columns and
the LM head (a [H, V] matmul, V ~ 50k) runs only there (``logits_to_keep``), not at all N*T positions: that is
most of the activation peak of a ZO forward and ~20% of its time on a 135M model. The last column (a candidate's
last token) predicts nothing and is never run; what remains of the C sequences of an example with single-token
candidates is one sequence, the prompt, and identical rows run once (``_unique_rows``). Position ids are passed
explicitly (``cumsum(attention_mask) - 1``), so each real token keeps the position it has unpadded; models whose
forward takes neither ``position_ids`` nor ``logits_to_keep`` are still scored correctly (full logits).

Alignment of ``option_mask``: ``option_mask[n, t] == 1`` iff ``input_ids[n, t + 1]`` is a candidate token, i.e. it
selects the rows of ``logits[:, :-1]`` whose targets ``input_ids[:, 1:]`` are candidate tokens. The last column is
always 0.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from l2zo.errors import L2ZOError
from l2zo.tasks.base import Example

LOSS_KINDS = ("classification", "lm")
# 2: the last column is never run and identical rows run once (single-token candidates share the prompt's row);
# 1: one row per candidate. Timing records (``l2zo bench``) carry it: a forward's cost depends on it.
SCORER_VERSION = 2
_CACHE_LIMIT = 200_000  # distinct strings kept tokenized; a run revisits the same ~1000 train prompts


@dataclass
class ScoringBatch:
    """B examples expanded into N = sum(num_candidates) sequences (example-major, candidate-minor).

    Attributes:
        input_ids: [N, T] long, left padded.
        attention_mask: [N, T] long, 1 on real tokens.
        option_mask: [N, T] float, 1.0 where the NEXT token is a candidate token (see the module docstring).
        example_index: [N] long, the example (0..B-1) each sequence belongs to.
        candidate_index: [N] long, the candidate index within its example.
        labels: [B] long, the correct candidate per example.
        num_candidates: [B] long.
    """

    input_ids: Tensor
    attention_mask: Tensor
    option_mask: Tensor
    example_index: Tensor
    candidate_index: Tensor
    labels: Tensor
    num_candidates: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ScoringBatch:
        """A copy with every tensor on ``device``."""
        return ScoringBatch(
            **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        )

    def __len__(self) -> int:
        """The number of examples B (not of sequences N)."""
        return int(self.labels.shape[0])


def _special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before the text (e.g. [BOS]), found by comparing encodings."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


class CandidateScorer:
    """Tokenizes examples into a :class:`ScoringBatch` and scores candidates with a causal LM.

    Args:
        tokenizer: a Hugging Face tokenizer (callable on a list of strings, returning ``input_ids``).
        max_length: the longest sequence; longer prompts are truncated from the left (after the special prefix),
            keeping the prompt's end and the whole candidate.
    """

    def __init__(self, tokenizer, max_length: int = 256) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise L2ZOError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
        self.pad_token_id = int(pad)
        self.prefix = _special_prefix(tokenizer)
        self._cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------------------------------------ batching

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids without special tokens, each distinct string tokenized once (and cached across batches)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            if len(self._cache) + len(missing) > _CACHE_LIMIT:
                self._cache.clear()
            ids = self.tokenizer(missing, add_special_tokens=False)["input_ids"]
            self._cache.update(zip(missing, (list(x) for x in ids), strict=True))
        return [self._cache[t] for t in texts]

    def _sequence(self, prompt_ids: list[int], cand_ids: list[int]) -> tuple[list[int], int]:
        """(token ids, index of the first candidate token), truncating the prompt from the left if too long."""
        if not cand_ids:
            raise L2ZOError("a candidate tokenizes to zero tokens; candidates must be non-empty strings")
        room = self.max_length - len(self.prefix) - len(cand_ids)
        if room < 1:
            raise L2ZOError(
                f"a candidate of {len(cand_ids)} tokens does not fit max_length={self.max_length}; raise max_length"
            )
        context = self.prefix + prompt_ids[-room:] if len(prompt_ids) > room else self.prefix + prompt_ids
        if not context:
            raise L2ZOError(
                "an empty prompt with a tokenizer that adds no BOS leaves the first candidate token "
                "without context; give the task a non-empty prompt"
            )
        return context + cand_ids, len(context)

    def collate(self, examples: list[Example]) -> ScoringBatch:
        """Build the batch (CPU tensors); usable as a DataLoader ``collate_fn``."""
        prompts = self._tokenize([ex.prompt for ex in examples])
        cands = self._tokenize([c for ex in examples for c in ex.candidates])
        seqs: list[tuple[list[int], int]] = []
        example_index: list[int] = []
        candidate_index: list[int] = []
        k = 0
        for b, (ex, prompt_ids) in enumerate(zip(examples, prompts, strict=True)):
            for c in range(len(ex.candidates)):
                seqs.append(self._sequence(prompt_ids, cands[k]))
                k += 1
                example_index.append(b)
                candidate_index.append(c)
        n, t = len(seqs), max((len(s) for s, _ in seqs), default=1)
        input_ids = torch.full((n, t), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, t), dtype=torch.long)
        option_mask = torch.zeros((n, t), dtype=torch.float32)
        for i, (ids, start) in enumerate(seqs):
            pad = t - len(ids)
            input_ids[i, pad:] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, pad:] = 1
            option_mask[i, pad + start - 1 : t - 1] = 1.0  # position t predicts token t + 1
        return ScoringBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            option_mask=option_mask,
            example_index=torch.tensor(example_index, dtype=torch.long),
            candidate_index=torch.tensor(candidate_index, dtype=torch.long),
            labels=torch.tensor([ex.label for ex in examples], dtype=torch.long),
            num_candidates=torch.tensor([len(ex.candidates) for ex in examples], dtype=torch.long),
        )

    # ------------------------------------------------------------------------------------------------- scoring

    @staticmethod
    def _option_logprobs(
        model, input_ids: Tensor, attention_mask: Tensor, option_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Log-probabilities of the candidate tokens of a left-padded batch.

        Returns:
            (rows [K], logp [K] fp32): the sequence of each of the K candidate tokens and its log-probability.
        """
        # The last column predicts nothing, so it is never run; without it, the C sequences of an example whose
        # candidates are single tokens are the same sequence (the prompt), run once: a 2-3x cheaper forward on
        # yes/no/maybe tasks. Rows are merged only when they are identical, so the result is the same.
        ids, mask, row_of = _unique_rows(input_ids[:, :-1], attention_mask[:, :-1])  # [M, T-1] each, [N]
        t = ids.shape[1]
        kwargs = {}
        takes = _forward_params(model)
        if "position_ids" in takes:
            kwargs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [M, T-1], as if unpadded
        elif bool((mask[:, 0] == 0).any()):
            raise L2ZOError(f"{type(model).__name__}.forward takes no position_ids, so left-padded batches would "
                            "shift its positions; use a model whose forward accepts position_ids")  # fmt: skip
        # Columns from `first` on hold every position that predicts a candidate token (see the module docstring).
        scored = option_mask[:, :-1]  # [N, T-1]
        first = int(scored.any(dim=0).nonzero()[0]) if bool(scored.any()) else t - 1
        if "logits_to_keep" in takes:
            kwargs["logits_to_keep"] = t - first  # >= 1
        logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits  # [M, T', V]
        offset = t - logits.shape[1]
        rows, cols = scored.nonzero(as_tuple=True)
        # Only the K candidate positions go through the fp32 log-softmax, never the full [M, T', V].
        picked = logits[row_of[rows], cols - offset].float().log_softmax(dim=-1)  # [K, V]
        logp = picked.gather(-1, input_ids[rows, cols + 1].unsqueeze(-1)).squeeze(-1)  # [K]
        return rows, logp

    def candidate_scores(self, model, batch: ScoringBatch) -> Tensor:
        """Length-normalised candidate log-likelihoods, [B, C_max] fp32, -inf where an example has fewer."""
        rows, logp = self._option_logprobs(model, batch.input_ids, batch.attention_mask, batch.option_mask)
        n = batch.input_ids.shape[0]
        sums = torch.zeros(n, dtype=torch.float32, device=logp.device).index_add_(0, rows, logp)  # [N]
        lengths = batch.option_mask.sum(dim=1).to(torch.float32)  # [N], >= 1 by construction
        per_seq = sums / lengths
        num_examples = batch.labels.shape[0]
        c_max = int(batch.candidate_index.max().item()) + 1 if n else 0
        scores = torch.full((num_examples, c_max), float("-inf"), dtype=torch.float32, device=logp.device)
        return scores.index_put((batch.example_index, batch.candidate_index), per_seq)

    def loss(self, model, batch: ScoringBatch, loss_kind: str) -> Tensor:
        """Training loss, fp32 scalar.

        "classification": cross-entropy over :meth:`candidate_scores` (MeZO's ``train_as_classification``).
        "lm": mean NLL over all tokens of the correct candidates in the batch (MeZO's COPA loss: HF cross-entropy
        with everything but the correct option's tokens masked); only the correct sequences are run.
        """
        if loss_kind == "classification":
            return F.cross_entropy(self.candidate_scores(model, batch), batch.labels)
        if loss_kind == "lm":
            keep = batch.candidate_index == batch.labels[batch.example_index]  # [N]
            attention_mask = batch.attention_mask[keep]
            t = int(attention_mask.sum(dim=1).max().item())  # trim padding the correct sequences do not need
            _, logp = self._option_logprobs(
                model, batch.input_ids[keep, -t:], attention_mask[:, -t:], batch.option_mask[keep, -t:]
            )
            return -logp.mean()
        raise L2ZOError(f"unknown loss kind {loss_kind!r}; valid choices: {', '.join(LOSS_KINDS)}")

    @staticmethod
    def loss_count(batch: ScoringBatch, loss_kind: str) -> int | Tensor:
        """How many terms :meth:`loss` averages: the examples ("classification"), or the correct candidates' scored
        tokens ("lm", a long scalar tensor), so that the losses of slices of a batch combine into the batch's."""
        if loss_kind == "lm":
            keep = batch.candidate_index == batch.labels[batch.example_index]  # [N]
            return batch.option_mask[keep][:, :-1].sum()
        return int(batch.labels.numel())

    def evaluate(self, model, batch: ScoringBatch) -> dict[str, Tensor]:
        """Sums for dev/test metrics: classification CE (whatever the training loss, so dev losses compare
        across tasks), argmax accuracy. Returns {"loss_sum": fp32 [], "correct": long [], "count": long []}."""
        scores = self.candidate_scores(model, batch)
        return {
            "loss_sum": F.cross_entropy(scores, batch.labels, reduction="sum"),
            "correct": (scores.argmax(dim=-1) == batch.labels).sum(),
            "count": torch.tensor(batch.labels.shape[0], dtype=torch.long, device=scores.device),
        }


def _unique_rows(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct (token ids, mask) rows of a batch, in their first-seen order, and where each row went.

    Args:
        input_ids, attention_mask: [N, T].
    Returns:
        (ids [M, T], mask [M, T], row_of [N] long): row n of the inputs is row ``row_of[n]`` of the outputs.
    """
    n = input_ids.shape[0]
    if n < 2:
        return input_ids, attention_mask, torch.arange(n, device=input_ids.device)
    key = torch.cat([input_ids, attention_mask], dim=1)  # a pad id may also be a real token: the mask tells them apart
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)  # sorted rows
    if uniq.shape[0] == n:  # nothing to merge: keep the batch as it came
        return input_ids, attention_mask, torch.arange(n, device=input_ids.device)
    # First-seen order, so merged batches keep the example order of the unmerged ones.
    first_seen = torch.full((uniq.shape[0],), n, dtype=torch.long, device=input_ids.device)
    first_seen.scatter_reduce_(0, inverse, torch.arange(n, device=input_ids.device), reduce="amin")
    keep = first_seen.sort().values  # [M] row indices into the inputs
    row_of = torch.empty(uniq.shape[0], dtype=torch.long, device=input_ids.device)
    row_of[inverse[keep]] = torch.arange(keep.shape[0], device=input_ids.device)
    return input_ids[keep], attention_mask[keep], row_of[inverse]


def _forward_params(model) -> frozenset[str]:
    """The keyword names ``model``'s forward accepts; ``model`` may be a module or a wrapper around one (it then
    exposes the module as ``.model``, as ``l2zo.learned.meta.FunctionalModel`` does). Cached per class."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", model)
    cls = type(module)
    if cls not in _PARAMS_CACHE:
        try:
            _PARAMS_CACHE[cls] = frozenset(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError, AttributeError):
            _PARAMS_CACHE[cls] = frozenset()
    return _PARAMS_CACHE[cls]


_PARAMS_CACHE: dict[type, frozenset[str]] = {}
