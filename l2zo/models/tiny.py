"""The project's own ``tiny`` and ``tiny-derived`` models: a ~1M-parameter Llama trained on the tiny world.

``tiny`` is pretrained on corpus (a) (facts and reviews, ``l2zo.synthetic.world``); ``tiny-derived``
is a copy of it trained further on corpus (b) (stories with negation): same architecture and
tokenizer, different weights. Both are shipped in ``checkpoints/`` (``scripts/build_tiny.py``
regenerates them); where that folder is missing (a non-editable install) :func:`tiny_dir` builds
them into the user cache with a shorter schedule on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from l2zo.synthetic.world import derived_corpus, pretrain_corpus

log = logging.getLogger(__name__)

TINY_NAMES: tuple[str, ...] = ("tiny", "tiny-derived")
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
VOCAB_SIZE = 1024
SHIPPED_ROOT = Path(__file__).resolve().parents[2] / "checkpoints"


@dataclass(frozen=True)
class Schedule:
    """One training phase: ``steps`` AdamW steps on batches of ``batch`` x ``seq_len`` tokens."""

    corpus: str  # a label for the logs: "pretrain" (corpus a), "derived" (corpus b), or another corpus's name
    steps: int
    n_docs: int
    batch: int = 24
    seq_len: int = 64  # documents are ~40 tokens; short blocks keep attention cheap
    lr: float = 5e-3
    warmup: int = 30
    seed: int = 0


# The shipped checkpoints (~1 min + ~0.5 min on 2 idle CPU cores) and the first-use fallback (< 1 min total).
FULL = (Schedule("pretrain", steps=500, n_docs=40_000), Schedule("derived", steps=250, n_docs=20_000, lr=1e-3, seed=1))
QUICK = (Schedule("pretrain", steps=200, n_docs=12_000), Schedule("derived", steps=60, n_docs=4_000, lr=1e-3, seed=1))


def tiny_config(vocab_size: int = VOCAB_SIZE) -> transformers.LlamaConfig:
    """The architecture shared by ``tiny`` and ``tiny-derived`` (~0.85M parameters, tied embeddings)."""
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``.

    The 256-byte initial alphabet means any text (any language, any symbol) encodes and decodes
    exactly; merges come from the world corpus. A "<s>" is prepended to every encoded text, like
    Llama's tokenizer.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=512,
    )


def token_blocks(tokenizer: transformers.PreTrainedTokenizerBase, docs: list[str], seq_len: int) -> torch.Tensor:
    """Pack the documents, each followed by the eos token, into a [N, seq_len] LongTensor of contiguous blocks.

    Each document is encoded as the tokenizer does by default (the tiny tokenizer prepends ``<s>``, so
    tiny sees ``<s> doc </s>``); the tail that does not fill a whole block is dropped.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("token_blocks needs a tokenizer with an eos token to separate the documents")
    ids: list[int] = []
    for enc in tokenizer(docs)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def train_lm(
    model: transformers.PreTrainedModel, blocks: torch.Tensor, sched: Schedule, *, precision: str = "32"
) -> list[float]:
    """Train ``model`` in place with AdamW (warmup + cosine) on random batches of ``blocks`` [N, T].

    ``precision`` "bf16-mixed" runs the forward under bf16 autocast over the fp32 weights (the loss
    stays fp32); "32" is plain fp32. Batches are moved to the model's device. Returns the per-step LM losses.
    """
    gen = torch.Generator().manual_seed(sched.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=sched.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < sched.warmup:
            return (step + 1) / sched.warmup
        progress = (step - sched.warmup) / max(1, sched.steps - sched.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))  # cosine from 1.0 down to 0.1

    sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    for step in range(sched.steps):
        idx = torch.randint(0, blocks.shape[0], (sched.batch,), generator=gen)  # on the CPU generator
        batch = blocks[idx].to(device)
        # The tiny builds use fp32: bf16 autocast is no faster on small CPU matmuls.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sch.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == sched.steps - 1:
            log.info("%s step %d/%d loss %.3f", sched.corpus, step + 1, sched.steps, loss.item())
    model.eval()
    return losses


def content_hash(folder: Path) -> str:
    """Short sha256 of the weights file: the ``revision`` of a tiny checkpoint."""
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:12]


def _save(model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerFast, folder: Path,
          info: dict) -> None:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {**info, "revision": content_hash(folder)}
    (folder / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")


def _phase_info(sched: Schedule, losses: list[float], seconds: float, n_tokens: int) -> dict:
    tail = losses[-20:]
    return {
        "schedule": asdict(sched),
        "corpus_tokens": n_tokens,
        "final_lm_loss": round(sum(tail) / len(tail), 4),  # mean of the last 20 steps
        "first_lm_loss": round(losses[0], 4),
        "train_seconds": round(seconds, 1),
    }


def build_tiny(root: Path, schedules: tuple[Schedule, Schedule] = FULL, command: str = "") -> dict[str, dict]:
    """Build ``root/tiny`` and ``root/tiny-derived`` from scratch; returns their build infos.

    Deterministic given the schedules (seeded corpora, init, batches) on a given machine and thread count.
    """
    base_s, derived_s = schedules
    torch.manual_seed(base_s.seed)
    docs_a = pretrain_corpus(base_s.n_docs, seed=base_s.seed)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(docs_a)
    # The world's text has few distinct words, so BPE runs out of merges below VOCAB_SIZE; size the
    # embedding to the tokenizer so no row is left untrained.
    model = transformers.LlamaForCausalLM(tiny_config(len(tokenizer))).float()
    common = {
        "command": command,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }

    blocks = token_blocks(tokenizer, docs_a, base_s.seq_len)
    t1 = time.perf_counter()
    losses = train_lm(model, blocks, base_s)
    phase_a = _phase_info(base_s, losses, time.perf_counter() - t1, blocks.numel())
    base_info = {**common, "model": "tiny", "phases": [phase_a]}
    base_info["wall_seconds"] = round(time.perf_counter() - t0, 1)
    _save(model, tokenizer, root / "tiny", base_info)

    t2 = time.perf_counter()
    blocks_b = token_blocks(tokenizer, derived_corpus(derived_s.n_docs, seed=derived_s.seed), derived_s.seq_len)
    losses_b = train_lm(model, blocks_b, derived_s)
    phase_b = _phase_info(derived_s, losses_b, time.perf_counter() - t2, blocks_b.numel())
    derived_info = {**common, "model": "tiny-derived", "base_revision": content_hash(root / "tiny")}
    derived_info["phases"] = [phase_a, phase_b]
    derived_info["wall_seconds"] = round(time.perf_counter() - t2, 1)
    _save(model, tokenizer, root / "tiny-derived", derived_info)
    return {"tiny": base_info, "tiny-derived": derived_info}


def cache_root() -> Path:
    """Where the first-use fallback builds: ``$L2ZO_CACHE`` or ``~/.cache/l2zo``."""
    return Path(os.environ.get("L2ZO_CACHE", Path.home() / ".cache" / "l2zo"))


def tiny_dir(name: str) -> Path:
    """The folder of ``tiny`` or ``tiny-derived``: shipped in checkpoints/, else built once into the cache."""
    if name not in TINY_NAMES:
        raise ValueError(f"not a tiny model: {name!r}")
    shipped = SHIPPED_ROOT / name
    if (shipped / "model.safetensors").is_file():
        return shipped
    cached = cache_root() / name
    if (cached / "model.safetensors").is_file():
        return cached
    log.warning("l2zo: %s not found in %s; building it into %s (quick schedule, under a minute)",
                name, SHIPPED_ROOT, cache_root())  # fmt: skip
    cache_root().mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder and move into place, so a crash or a concurrent build never leaves
    # a half-written checkpoint behind.
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        build_tiny(Path(tmp), QUICK, command="l2zo.models.tiny.tiny_dir (first-use fallback)")
        for n in TINY_NAMES:
            if not (cache_root() / n).exists():
                shutil.move(str(Path(tmp) / n), str(cache_root() / n))
    return cached


@torch.no_grad()
def zero_shot_accuracy(model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase,
                       examples: list, batch_size: int = 64) -> float:  # fmt: skip
    """Accuracy of the argmax over candidates of the mean candidate-token log-likelihood.

    A self-contained check that a checkpoint "knows something" (used by ``scripts/build_tiny.py``
    and the tests); training and evaluation use ``l2zo.tasks.scoring``. ``examples`` are
    :class:`l2zo.tasks.base.Example`. Each (prompt, candidate) pair is one padded row of a
    [rows, T] batch; the score of a row is the mean log-prob of its candidate tokens.
    """
    rows: list[tuple[list[int], int]] = []  # (token ids, number of candidate tokens)
    for ex in examples:
        prompt = tokenizer(ex.prompt)["input_ids"]
        for cand in ex.candidates:
            c = tokenizer(cand, add_special_tokens=False)["input_ids"]
            rows.append((prompt + c, len(c)))
    scores: list[float] = []
    model.eval()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (seq, _) in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # [R, T, V]
        for r, (seq, n_cand) in enumerate(chunk):
            pos = torch.arange(len(seq) - n_cand, len(seq))  # positions of the candidate tokens
            scores.append(logp[r, pos - 1, torch.tensor(seq)[pos]].mean().item())
    correct, k = 0, 0
    for ex in examples:
        s = scores[k : k + len(ex.candidates)]
        k += len(ex.candidates)
        correct += int(max(range(len(s)), key=s.__getitem__) == ex.label)
    return correct / max(1, len(examples))
