"""The training loop: adversarial training of the token merger and pruner heads on a frozen LLaVA.

One step (every rank of a torchrun job runs it on its share of the global batch):
  1. vision tower (frozen, no gradient) once for both models
  2. the full model: answer-position logits and text-token features ("real"), no gradient
  3. the pruned model with soft decisions (forward.py): logits and features ("fake")
  4. generator loss = adv_loss_weight * adversarial + task_loss_weight * (CE + KL)
                      + merge_sparsity_weight * sparsity  ->  merger and pruner optimizers
  5. discriminator loss on detached features -> discriminator optimizer
Gradients are averaged over ranks (all-reduce, as DDP does) before each optimizer step, so
every rank holds the same weights; rank 0 writes the log, the checkpoints and the progress bar.

Reproducible: the data order (a permutation per epoch) and the Gumbel noise are functions of
(seed, step, rank), so a resumed run continues exactly where an uninterrupted one would be.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..engine import LlavaEngine
from ..engine.generate import vision_features
from ..engine.inputs import PreparedBatch
from ..engine.runtime import default_device_dtype
from ..errors import CheckpointError, VtpruneError
from ..files import check_output_dir
from ..pruning.config import PruningConfig
from ..pruning.modules import PruningModules
from ..pruning.plan import PruningPlan
from ..pruning.weights import load_pruning_weights, save_pruning_weights
from ..validate import check_bool, check_choice, check_int, check_number, show
from .checkpoint import load_checkpoint, read_state, save_checkpoint
from .data import TrainingData
from .discriminator import Discriminator
from .forward import BatchBuilder, feature_layers, student_forward, teacher_forward
from .losses import (ADV_LOSSES, answer_weights, discriminator_accuracy, discriminator_loss, generator_adv_loss,
                     sparsity_loss, task_losses)
from .ema import WeightAverage
from .schedule import lr_factor_at, temperature_at


@dataclass
class TrainSettings:
    model: str
    config: str
    data: str
    out: str
    steps: int | None = None          # default: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 4               # per process
    device: str | None = None         # default: cuda if available
    dtype: str | None = None          # frozen model's dtype (default: bfloat16 on cuda, float32 on cpu)
    seed: int = 0
    adv_loss: str = "hinge"           # or "non_saturating" (README, *Measured quality*: why hinge)
    max_grad_norm: float = 1.0        # per optimizer; 0 = no clipping
    save_every: int = 200             # steps between checkpoints (and one at the end)
    gradient_checkpointing: bool = False
    progress: bool = True

    # settings a resumed run must share with the run it continues
    RESUME_KEYS = ("steps", "batch_size", "seed", "adv_loss", "world_size", "pruning")

    def check(self) -> None:
        """Every setting's type and range; the message names the setting and its CLI flag."""
        def name(key):
            return f"{key} (--{key.replace('_', '-')})"

        for key in ("model", "config", "data", "out"):
            v = getattr(self, key)
            if not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
                raise VtpruneError(f"{name(key)} must be a path, got {show(v)}")
        if self.steps is not None:
            check_int(self.steps, name("steps"), 1)
        check_number(self.epochs, name("epochs"), 0, lo_open=True, want="a number > 0")
        check_int(self.batch_size, name("batch_size"), 1)
        check_int(self.save_every, name("save_every"), 1)
        # torch.manual_seed takes 64 bits; the per-epoch data order seeds with seed * 7777 + epoch
        # modulo 2**63 (Trainer._perm), so every seed in this range gives its own order
        check_int(self.seed, name("seed"), 0, 2**63 - 1)
        check_choice(self.adv_loss, name("adv_loss"), ADV_LOSSES)
        check_number(self.max_grad_norm, "max_grad_norm", 0, want="a number >= 0 (0: no clipping)")
        for key in ("device", "dtype"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, str):
                raise VtpruneError(f"{name(key)} must be a string such as 'cuda' / 'bfloat16', got {show(v)}")
        for key in ("gradient_checkpointing", "progress"):
            check_bool(getattr(self, key), key)


def _seed_for(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + 12_345) % (2**31 - 64)


class Trainer:
    def __init__(self, settings: TrainSettings, resume: bool = False):
        s = self.settings = settings
        s.check()
        # the run directory must be creatable before anything slow runs (not under a file, writable)
        check_output_dir(s.out, "training run directory (--out)")
        device, dtype = default_device_dtype(s.device, s.dtype)
        self.rank, self.world = _init_distributed("nccl" if str(device).startswith("cuda") else "gloo")
        if self.world > 1 and str(device).startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)

        self.cfg = PruningConfig.load(s.config)
        if self.cfg.policy != "two_stage":
            raise VtpruneError(f"pruning config: only policy 'two_stage' has weights to train, got "
                               f"{self.cfg.policy!r}")
        # check everything the user gave before the (slow) model load
        self.data = TrainingData(s.data)
        if s.steps is None:
            per_epoch = math.ceil(len(self.data) / (s.batch_size * self.world))
            s.steps = max(1, round(s.epochs * per_epoch))
        state = read_state(s.out) if os.path.isdir(s.out) else None  # a corrupt state.json: one error
        if resume and state is None:
            raise CheckpointError(f"--resume: no checkpoint in {s.out} (expected {s.out}/checkpoint/state.json)")
        if not resume and state is not None:
            raise VtpruneError(f"{s.out} already holds a training run (step {state['step']}): pass --resume to "
                               f"continue it, or choose another --out")

        self.engine = LlavaEngine.from_pretrained(s.model, device=device, dtype=dtype)
        self.model = self.engine.model.requires_grad_(False).eval()
        mcfg = self.mcfg = self.model.cfg
        self.cfg.check_against_model(mcfg.num_visual_tokens, mcfg.text.num_layers)
        self.device, self.dtype = self.engine.device, self.engine.dtype

        torch.manual_seed(s.seed)  # every rank starts from the same weights
        self.modules = PruningModules.for_model(self.cfg, mcfg)
        if self.cfg.weights:  # start from earlier weights
            load_pruning_weights(self.modules, self.cfg.weights)
        self.layers = feature_layers(self.cfg, mcfg.text.num_layers)
        self.plan = PruningPlan(self.cfg, mcfg, self.modules)  # the student forward's stage 0 and layer loop
        self.discriminator = Discriminator(mcfg.text.hidden_size, len(self.layers))
        self.modules.to(self.device).train()
        self.discriminator.to(self.device).train()
        lrs = self.cfg.optimizers
        # a merge-only config (pruning_layers []) has no pruner heads: no optimizer for them
        # (AdamW refuses an empty parameter list)
        trained = {"token_merger": self.modules.merger, "layer_pruners": self.modules.pruners,
                   "discriminator": self.discriminator}
        self.optimizers = {name: torch.optim.AdamW(m.parameters(), lr=lrs[name]["lr"])
                           for name, m in trained.items() if list(m.parameters())}
        tok = self.engine.tokenizer
        eos = self.engine.eos_token_ids[0] if self.engine.eos_token_ids else tok.eos_token_id
        if eos is None:
            raise VtpruneError(f"{s.model}: the tokenizer has no EOS token to end answers with")
        self.builder = BatchBuilder(tok, self.engine.image_processor, mcfg.image_token_index,
                                    mcfg.num_visual_tokens, min(self.cfg.target_merge_tokens, mcfg.num_visual_tokens),
                                    eos, self.engine.pad_token_id)
        self.base_lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in self.optimizers.items()}
        self.ema = WeightAverage(self.modules, self.cfg.ema_decay) if self.cfg.ema_decay > 0 else None
        self.step = 0
        if resume:
            self._check_resumable(state)
            self.step = load_checkpoint(s.out, self.modules, self.discriminator, self.optimizers, self.ema)
        os.makedirs(s.out, exist_ok=True)
        self.log_path = os.path.join(s.out, "log.jsonl")

    # ------------------------------------------------------------------ setup helpers
    def _run_settings(self) -> dict:
        d = {k: v for k, v in asdict(self.settings).items() if k not in ("progress",)}
        d["world_size"] = self.world
        d["pruning"] = {k: v for k, v in self.cfg.to_dict().items() if k != "weights"}
        return d

    def _check_resumable(self, state: dict) -> None:
        saved, now = state.get("settings", {}), self._run_settings()
        for key in TrainSettings.RESUME_KEYS:
            if saved.get(key) != now.get(key):
                raise CheckpointError(f"--resume: this run's {key} ({_short(now.get(key))}) differs from the "
                                      f"checkpoint's ({_short(saved.get(key))}); use the same settings or a new --out")

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # ------------------------------------------------------------------ data
    def examples_for(self, step: int, rank: int | None = None) -> list:
        """This rank's examples for `step`: the global batch is positions [step * G, (step + 1) * G)
        of an endless stream that walks a fresh permutation of the data each epoch."""
        rank = self.rank if rank is None else rank
        n, b = len(self.data), self.settings.batch_size
        G = b * self.world
        out = []
        for i in range(step * G + rank * b, step * G + (rank + 1) * b):
            epoch, j = divmod(i, n)
            perm = self._perm(epoch)
            out.append(self.data[int(perm[j])])
        return out

    def _perm(self, epoch: int) -> torch.Tensor:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            g = torch.Generator().manual_seed((self.settings.seed * 7_777 + epoch) % 2**63)
            cache = self._perm_cache = (epoch, torch.randperm(len(self.data), generator=g))
        return cache[1]

    # ------------------------------------------------------------------ one step
    def noise_at(self, step: int) -> bool:
        """Whether `step` (0-based) draws Gumbel noise: all but the last noise_off_fraction of the steps."""
        return step < round((1.0 - self.cfg.noise_off_fraction) * self.settings.steps)

    def losses(self, step: int, noise: bool | None = None, examples=None) -> dict:
        """Forward both models on this step's (or the given) examples; returns the loss terms
        (tensors) and what the log reports. noise None: the schedule's (noise_at)."""
        cfg, s = self.cfg, self.settings
        noise = self.noise_at(step) if noise is None else noise
        batch = self.builder.build(examples if examples is not None else self.examples_for(step),
                                   self.device, self.dtype)
        tau = temperature_at(step, s.steps, cfg.temperature, cfg.temperature_min, cfg.temperature_anneal_rate)
        with self._autocast():
            with torch.no_grad():
                B = batch.pixel_values.shape[0]
                vis = vision_features(self.model, PreparedBatch(batch.full.input_ids, batch.full.lengths,
                                                                batch.pixel_values))
                t_logits, real = teacher_forward(self.model, batch, vis, self.layers)
            out = student_forward(self.model, self.modules, cfg, batch, vis, tau, _seed_for(s.seed, step, self.rank),
                                  self.layers, noise=noise, gradient_checkpointing=s.gradient_checkpointing,
                                  plan=self.plan)
            answers = batch.pruned.lengths - batch.pruned.prompt_lengths  # answer positions per row
            ce, kl = task_losses(out.logits, t_logits, batch.targets, answer_weights(answers, cfg.task_loss_average))
            d_fake = self.discriminator(out.features)
            adv = generator_adv_loss(d_fake, s.adv_loss)
            M = self.builder.pruned.num_visual_tokens
            sparsity = sparsity_loss(out.merge_logits, torch.ones_like(out.merge_logits, dtype=torch.bool), M)
            for layer, keep in zip(cfg.pruning_layers, cfg.layer_keep_tokens):
                sparsity = sparsity + sparsity_loss(out.head_logits[layer], out.candidates[layer], min(keep, M))
        g_loss = cfg.adv_loss_weight * adv + cfg.task_loss_weight * (ce + kl) + cfg.merge_sparsity_weight * sparsity
        return {"g_loss": g_loss, "adv": adv, "ce": ce, "kl": kl, "sparsity": sparsity, "tau": tau,
                "real": real, "fake": out.features, "batch_size": B,
                "kept": [M] + [float(out.kept[layer].float().mean()) for layer in cfg.pruning_layers]}

    def train_step(self, step: int) -> dict:
        factor = lr_factor_at(step, self.settings.steps, self.cfg.lr_schedule)
        for name, opt in self.optimizers.items():
            for g, lr in zip(opt.param_groups, self.base_lrs[name]):
                g["lr"] = lr * factor
        terms = self.losses(step)
        gen_opts = [opt for name, opt in self.optimizers.items() if name != "discriminator"]
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        terms["g_loss"].backward()
        for opt in gen_opts:
            self._sync_and_clip(opt)
            opt.step()
        if self.ema is not None:
            self.ema.update(self.modules)
        # the discriminator learns from detached features; its gradients from the generator loss go
        d_opt = self.optimizers["discriminator"]
        d_opt.zero_grad(set_to_none=True)
        with self._autocast():
            d_real = self.discriminator(terms["real"])
            d_fake = self.discriminator(terms["fake"].detach())
            d_loss = discriminator_loss(d_real, d_fake, self.settings.adv_loss)
        d_loss.backward()
        self._sync_and_clip(d_opt)
        d_opt.step()
        record = {"step": step + 1, "tau": terms["tau"], "lr_factor": factor, "noise": self.noise_at(step)}
        for k in ("g_loss", "adv", "ce", "kl", "sparsity"):
            record[k] = float(terms[k].detach())
        record["d_loss"] = float(d_loss.detach())
        record["d_acc"] = discriminator_accuracy(d_real.detach(), d_fake.detach())
        record["kept_tokens"] = terms["kept"]
        return self._mean_over_ranks(record)

    def _sync_and_clip(self, opt: torch.optim.Optimizer) -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        for p in params:  # every rank reduces the same buffers, also for unused parameters
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world > 1:
            import torch.distributed as dist

            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p))
                offset += n
        if self.settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm)

    def _mean_over_ranks(self, record: dict) -> dict:
        if self.world == 1:
            return record
        import torch.distributed as dist

        keys = ["g_loss", "adv", "ce", "kl", "sparsity", "d_loss", "d_acc"]
        vals = torch.tensor([record[k] for k in keys] + record["kept_tokens"], dtype=torch.float64)
        dist.all_reduce(vals)
        vals /= self.world
        record.update({k: float(v) for k, v in zip(keys, vals[: len(keys)])})
        record["kept_tokens"] = [float(v) for v in vals[len(keys):]]
        return record

    # ------------------------------------------------------------------ the loop
    def train(self, stop_after: int | None = None) -> dict | None:
        """Run to `settings.steps` (or stop after `stop_after` more steps, for tests); checkpoints
        every save_every steps and at the end (also on Ctrl-C). Returns the last log record."""
        s = self.settings
        end = s.steps if stop_after is None else min(s.steps, self.step + stop_after)
        if self.rank == 0:
            self._trim_log(self.step)
        bar = None
        if s.progress and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=s.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        record = None
        saved_at = self.step
        try:
            while self.step < end:
                t0 = time.perf_counter()
                record = self.train_step(self.step)
                self.step += 1
                record["seconds"] = time.perf_counter() - t0
                if self.rank == 0:
                    with open(self.log_path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{record['g_loss']:.3f}", ce=f"{record['ce']:.3f}",
                                        d_acc=f"{record['d_acc']:.2f}", tau=f"{record['tau']:.2f}")
                if self.step % s.save_every == 0 or self.step == s.steps:
                    self.save()
                    saved_at = self.step
        except KeyboardInterrupt:
            if self.step > saved_at:
                self.save()
            if self.rank == 0:
                print(f"\ninterrupted: checkpoint at step {self.step} in {s.out}; continue with --resume",
                      file=sys.stderr)
            raise
        finally:
            if bar is not None:
                bar.close()
        if self.step > saved_at:
            self.save()
        return record

    def save(self) -> None:
        """Checkpoint (rank 0), plus the trained weights and a config that loads them:
        LlavaEngine.from_pretrained(model, pruning=OUT/pruning.yaml)."""
        if self.rank == 0:
            s = self.settings
            save_checkpoint(s.out, self.step, self.modules, self.discriminator, self.optimizers,
                            self._run_settings(), self.ema)
            tmp = os.path.join(s.out, "pruning.safetensors.tmp")
            if self.ema is None:
                save_pruning_weights(self.modules, tmp)
            else:  # the heads inference gets are the average (training/ema.py says why)
                with self.ema.swap_into(self.modules):
                    save_pruning_weights(self.modules, tmp)
            os.replace(tmp, os.path.join(s.out, "pruning.safetensors"))
            import yaml
            cfg = self.cfg.to_dict()
            cfg["weights"] = "pruning.safetensors"
            with open(os.path.join(s.out, "pruning.yaml"), "w", encoding="utf-8") as f:
                f.write(f"# trained by `vtprune train` to step {self.step} of {s.steps}"
                        f"{' (weights: the EMA, decay %g)' % self.cfg.ema_decay if self.ema else ''}\n")
                yaml.safe_dump(cfg, f, sort_keys=False)
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def _trim_log(self, step: int) -> None:
        """On resume, drop log lines past the checkpoint (steps that will run again)."""
        if not os.path.isfile(self.log_path):
            return
        with open(self.log_path, encoding="utf-8") as f:
            keep = [ln for ln in f if ln.strip() and _log_step(ln) <= step]
        with open(self.log_path, "w", encoding="utf-8") as f:
            f.writelines(keep)

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _log_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, ValueError):
        return 1 << 60  # an unreadable (torn) line is dropped


def _short(v) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) < 60 else text[:57] + "..."


def _init_distributed(backend: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def train(settings: TrainSettings, resume: bool = False) -> dict | None:
    trainer = Trainer(settings, resume)
    try:
        return trainer.train()
    finally:
        trainer.close()
