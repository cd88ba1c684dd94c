"""Fine-tuning: CLIP contrastive (whole model, as TIME) or vision-only against a frozen zero-shot
text head (as OPCM and CMM), with AdamW, a cosine schedule after a linear warm-up, grad-norm
clipping, and replay of the pretraining pool and of earlier tasks.

Seeded and deterministic on the CPU (batches are drawn from a `torch.Generator`); bf16 autocast
and optional `torch.compile` on a GPU. Returns the trained weights and AdamW's `exp_avg_sq`
(a diagonal Fisher estimate for CMM's merge). With `checkpointing` (`chronomerge.resume`), writes
progress checkpoints and resumes from the newest valid one, bit-identically on the CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from chronomerge import faults, resume
from chronomerge.config import TrainSection
from chronomerge.data import Split
from chronomerge.models import autocast, model_input, preprocess_of
from chronomerge.progress import Progress

TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")


@dataclass
class TrainResult:
    state: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0


def lr_at(step: int, cfg: TrainSection) -> float:
    """Linear warm-up over the first `warmup` fraction of steps, then cosine decay to 0."""
    warm = max(1, int(round(cfg.warmup * cfg.steps)))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def is_text_param(name: str) -> bool:
    return name.startswith(TEXT_PREFIXES)


def _batch_indices(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(n, (k,), generator=gen)


def train(model: torch.nn.Module, task: Split, cfg: TrainSection, *, tokenizer, device="cpu",
          replay_pool: Split | None = None, previous: Sequence[Split] = (),
          progress: str | None = None,
          checkpointing: resume.Checkpointing | None = None) -> TrainResult:
    """Fine-tune `model` in place on `task` and return its weights and AdamW second moments.

    `cfg` is params.yaml's validated `train` section (`chronomerge.config.TrainSection`), so its
    values are already checked. `mode="clip"`: symmetric InfoNCE between images and their captions
    (text tower trained unless `train_text=False`), or with `text="classes"` between images and their
    class prompts (`class_texts`; FLYP, Goyal et al., CVPR 2023: fine-tune like you pretrain, on the
    zero-shot head's texts); replayed images keep their captions. `mode="linear"`: as "vision", but the image tower
    is linearized around the weights it starts from (CMM pre-merge; see `Linearized`).
    `mode="vision"`: cross-entropy of `logit_scale · f(x) · head` over the task's classes with the
    text tower frozen; `head` is the zero-shot head of `model` as given. A retrieval task (scored by
    caption recall@5) has no classes to learn: its distinct captions are the classes, each its own
    text (`caption_classes`), so the head is the frozen text tower's embedding of every caption and
    the loss raises the image-to-caption similarities that recall@5 ranks. Trained on class labels
    instead, the image features forget the colour, size and position the captions name and the
    expert ends below zero-shot on its own task. `progress`, a label
    ("train t003-letters-painting"), reports progress under it (`chronomerge.progress`); None is silent.
    `checkpointing`: write progress checkpoints there and resume from the newest valid one
    (`chronomerge.resume`); its stage names the kill points (`train:step:<k>` without it).
    """
    if cfg.replay_pretrain and replay_pool is None:
        raise ValueError("train.replay_pretrain > 0 needs the pretraining pool (replay_pool)")
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    model.to(dev)
    train_text = cfg.train_text and cfg.mode == "clip"
    for name, p in model.named_parameters():
        p.requires_grad_(train_text or not is_text_param(name))
    head = None
    if cfg.mode == "clip" and cfg.text == "classes":
        task = class_texts(task)
    if cfg.mode != "clip":
        from chronomerge.evaluate import text_head
        task = caption_classes(task) if task.kind == "retrieval" else task
        head = text_head(model, tokenizer, task.classes, task.templates, dev)
    with gpu_slot(dev), (_FORWARD_AD if cfg.mode == "linear" else contextlib.nullcontext()):
        return _train(model, task, cfg, tokenizer=tokenizer, dev=dev, replay_pool=replay_pool, previous=previous,
                      head=head, progress=progress, ck=checkpointing)


def class_texts(task: Split) -> Split:
    """`task` with each image's caption replaced by its class prompt: the task's zero-shot templates in
    turn (image i takes template i mod their number) filled with its class name. A retrieval task keeps
    its captions, which are its classes (`caption_classes`). In a batch, images of one class share a
    prompt and count as each other's negatives, as in FLYP."""
    if task.kind == "retrieval":
        return task
    n = len(task.templates)
    return dataclasses.replace(task, captions=[task.templates[i % n].format(c=task.classes[label])
                                               for i, label in enumerate(task.labels)])


def caption_classes(task: Split) -> Split:
    """A retrieval task as a classification task over its distinct captions (template "{c}"): the
    target of vision-only training on it. Identical captions are one class, as recall@5 counts them."""
    classes, labels = np.unique(np.asarray(task.captions), return_inverse=True)
    return Split(task.images, labels, list(classes), ["{c}"], task.captions)


# torch's forward-mode AD levels (and the attention fast-path switch) are process-global: linearized
# trainings in threads of one process (a sweep's parallel runs) take turns.
_FORWARD_AD = threading.Lock()

# A training holds its GPU: trainings in threads of one process (a sweep's points on threads, or the
# points a Dask worker runs at once with --points-per-gpu) take turns on it; merges and evaluations
# share it with them.
_GPU_TRAINING = threading.Lock()


def gpu_slot(device: torch.device):
    """The context a training on `device` runs in: the GPU's training lock on CUDA, nothing on the CPU."""
    return _GPU_TRAINING if device.type == "cuda" else contextlib.nullcontext()


def _train(model, task, cfg, *, tokenizer, dev, replay_pool, previous, head, progress, ck) -> TrainResult:
    gen = torch.Generator().manual_seed(cfg.seed)
    lin = Linearized(model) if cfg.mode == "linear" else None
    params = lin.tau if lin else {n: p for n, p in model.named_parameters() if p.requires_grad}
    decays = {n: p.ndim >= 2 and "embedding" not in n for n, p in params.items()}  # matrices only
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in params.items() if decays[n]], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in params.items() if not decays[n]], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
        fused=dev.type == "cuda",
    )
    step_fn = _clip_step if cfg.mode == "clip" else _vision_step  # linear: the vision step on f_lin
    fwd = lin or (torch.compile(model) if (cfg.compile and dev.type == "cuda") else model)
    sources = [(task, 1 - cfg.replay_pretrain - (cfg.replay_previous if previous else 0.0))]
    if cfg.replay_pretrain:
        sources.append((replay_pool, cfg.replay_pretrain))
    if previous and cfg.replay_previous:
        merged_prev = Split(np.concatenate([p.images for p in previous]), np.concatenate([p.labels for p in previous]),
                            [], [], [c for p in previous for c in p.captions])
        sources.append((merged_prev, cfg.replay_previous))
    counts = _split_counts(cfg.batch_size, [w for _, w in sources])
    # Each source moves to the device once (uint8 images, token ids, labels); a step only indexes.
    staged = [(torch.from_numpy(np.ascontiguousarray(src.images)).to(dev),
               tokenizer(list(src.captions)).to(dev) if cfg.mode == "clip" else None,
               torch.from_numpy(np.asarray(src.labels)).to(dev), k) for (src, _), k in zip(sources, counts) if k]
    # Every step's batch indices, drawn in step order up front and moved to the device at once: a
    # per-step copy from pageable host memory would make the host wait for the device every step.
    draws = [[_batch_indices(len(imgs), k, gen) for imgs, _, _, k in staged] for _ in range(cfg.steps)]
    indices = [torch.stack([d[j] for d in draws]).to(dev) for j in range(len(staged))]
    pp = preprocess_of(model)
    model.train()
    losses: list[torch.Tensor] = []

    def progress_state() -> dict[str, torch.Tensor]:
        return ({f"model.{k}": v for k, v in model.state_dict().items()}
                | ({f"tau.{k}": v for k, v in lin.tau.items()} if lin else {}))

    start, fp = 0, resume.fingerprint(cfg.model_dump(mode="json"), cfg.steps, progress_state()) if ck else ""
    if ck is not None and (got := ck.resume(fp)) is not None:
        start, saved, meta = got
        model.load_state_dict({k[6:]: v for k, v in saved.items() if k.startswith("model.")})
        with torch.no_grad():
            for k, p in (lin.tau.items() if lin else ()):
                p.copy_(saved[f"tau.{k}"])
        resume.load_optimizer_state(opt, saved, meta)
        resume.load_rng_state(saved)
        losses = [x.to(dev) for x in saved["losses"].unbind()]
        resume.say_resumed(progress or f"{ck.stage} ({cfg.mode})", start, cfg.steps, ck.folder)
    bar = Progress(progress, cfg.steps, start=start) if progress else None
    skip = start + min(10, (cfg.steps - start) // 5)  # steady-state throughput excludes warm-up (and compilation)
    t0 = t_steady = time.perf_counter()
    point = ck.stage if ck else "train"
    for step in range(start, cfg.steps):
        faults.point(f"{point}:step:{step}")
        if step == skip:
            _sync(dev)
            t_steady = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        picks = [(imgs, toks, labels, idx[step]) for (imgs, toks, labels, _), idx in zip(staged, indices)]
        # each source to the model's input first: the task's images and the replayed pool's may differ in size
        x = torch.cat([model_input(imgs[i], pp) for imgs, _, _, i in picks])
        with autocast(dev, cfg.bf16):
            if cfg.mode == "clip":
                loss = step_fn(fwd, x, torch.cat([toks[i] for _, toks, _, i in picks]))
            else:
                loss = step_fn(fwd, x, torch.cat([labels[i] for _, _, labels, i in picks]), head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        opt.step()
        losses.append(loss.detach())  # no host sync per step
        if bar is not None:
            bar.update(step, losses[-1].item)
        if ck is not None and step + 1 < cfg.steps and ck.due(step + 1):
            opt_tensors, opt_meta = resume.optimizer_state(opt)
            ck.save(step + 1, cfg.steps, {**progress_state(), **opt_tensors, **resume.rng_state(),
                                          "losses": torch.stack(losses).float()}, fp, opt_meta)
    _sync(dev)
    end = time.perf_counter()
    secs = end - t0
    if bar is not None:
        bar.close()
    names = {id(p): n for n, p in (params.items() if lin else model.named_parameters())}
    if lin:
        lin.fold()
    exp_avg_sq = {names[id(p)]: s["exp_avg_sq"].detach().float().cpu().clone()
                  for p, s in opt.state.items() if "exp_avg_sq" in s}
    for p in model.parameters():
        p.requires_grad_(True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return TrainResult(state, exp_avg_sq, torch.stack(losses).float().cpu().tolist(), secs,
                       (cfg.steps - skip) * cfg.batch_size / max(end - t_steady, 1e-9))


class Linearized(torch.nn.Module):
    """The image tower linearized around θ0 (CMM pre-merge, tangent-space fine-tuning):

        f_lin(x; θ0 + τ) = f(x; θ0) + J_θ f(x; θ0) · τ      (torch.func.jvp)

    Only τ (one tensor per image-tower parameter, zero at the start) is trained; the text tower
    and θ0 stay frozen. `fold()` writes θ0 + τ into the model: the expert is a plain open_clip model.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.theta0 = {n: p.detach() for n, p in model.visual.named_parameters()}
        self.tau = {f"visual.{n}": torch.nn.Parameter(torch.zeros_like(p)) for n, p in self.theta0.items()}
        self.logit_scale = model.logit_scale

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        names = list(self.theta0)
        f = lambda *p: torch.func.functional_call(self.model.visual, dict(zip(names, p)), (x,))  # noqa: E731
        # Fused attention kernels have no forward-mode AD: use the plain (math) attention path.
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                out, jvp_out = torch.func.jvp(f, tuple(self.theta0.values()), tuple(self.tau.values()))
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        feats = out + jvp_out
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, image: torch.Tensor, text: None = None):
        """As open_clip's CLIP.forward for an image batch alone: (features, None, exp(logit_scale))."""
        return self.encode_image(image, normalize=True), None, self.logit_scale.exp()

    @torch.no_grad()
    def fold(self) -> None:
        for n, p in self.model.visual.named_parameters():
            p.add_(self.tau[f"visual.{n}"])


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _split_counts(batch: int, weights: list[float]) -> list[int]:
    counts = [int(round(batch * w)) for w in weights]
    counts[0] = batch - sum(counts[1:])
    return counts


# Both steps call the model itself (open_clip's forward: normalised image and text features and
# exp(logit_scale)), not its encode_* methods, so that a torch.compile'd model runs compiled.
def _clip_step(model, x, tokens) -> torch.Tensor:
    img, txt, scale = model(x, tokens)[:3]
    logits = scale * img @ txt.T
    target = torch.arange(len(x), device=x.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _vision_step(model, x, labels, head) -> torch.Tensor:
    img, _, scale = model(x, None)[:3]
    logits = scale.detach() * img @ head.to(img.dtype)
    return F.cross_entropy(logits, labels)


def pretrain(model: torch.nn.Module, pool: Split, cfg: TrainSection, *, tokenizer, device="cpu",
             progress: str | None = None, checkpointing: resume.Checkpointing | None = None) -> TrainResult:
    """Contrastive pretraining of the embedded base model on the pretraining pool's captions."""
    if cfg.mode != "clip" or cfg.text != "captions":
        raise ValueError("pretraining is contrastive on the pool's captions: train.mode must be 'clip', "
                         "train.text 'captions'")
    return train(model, pool, cfg, tokenizer=tokenizer, device=device, progress=progress,
                 checkpointing=checkpointing)
