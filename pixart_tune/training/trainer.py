"""``pixart-tune train``: LoRA training of PixArt-Sigma from a prepared feature cache.

One class, :class:`Trainer`, with ``setup`` / ``train`` / ``save_checkpoint`` /
``cleanup``. ``setup`` builds everything in small ``_setup_*`` steps; ``train`` is the
loop, top to bottom; ``train_step`` is one micro-step (forward, loss, backward,
optimizer step on accumulation boundaries) and is all the hot path does between
log points: no host-device synchronisation, no casts of the base weights.

Devices, DDP and gradient accumulation go through accelerate, so the same code runs
on a CPU, one GPU, or ``accelerate launch`` over several.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import datetime
import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pixart_tune import __version__
from pixart_tune.adapters.loader import load_into, read_lora
from pixart_tune.adapters.lora import inject_lora, save_adapter, trainable_parameters
from pixart_tune.base import ADAPTER_DIR, RUN_CONFIG, resolve_dtype
from pixart_tune.config import save_yaml, to_dict
from pixart_tune.errors import UserError
from pixart_tune.models import load_noise_scheduler, load_transformer, quiet_loading
from pixart_tune.parts import resolve_parts, use_components
from pixart_tune.training import checkpoint as ckpt
from pixart_tune.training import plots, speed
from pixart_tune.training.config import TrainConfig, check_lora_targets
from pixart_tune.training.dataset import Batch, BucketBatchSampler, TrainingSet, check_fits_model, collate, dataset_fingerprint, model_text_fingerprint, model_vae_scaling_factor
from pixart_tune.training.ema import LoraEma
from pixart_tune.training.judging import Judging
from pixart_tune.training.loss import TrainingLoss
from pixart_tune.training.lora_dtype import set_lora_compute_dtype
from pixart_tune.training.optim import build_lr_scheduler, build_optimizer, optimizer_advice, set_optimizer_mode
from pixart_tune.training.outputs import RAW_ADAPTER_DIR, check_output_dir, write_comfyui_file
from pixart_tune.training.tracking import RunLog, Window, make_trackers, peak_memory_gb
from pixart_tune.training.validation import Validator, encode_prompts

logger = logging.getLogger(__name__)


class Trainer(Judging):
    """Trains one LoRA as ``config`` says; ``resume`` is None, ``"latest"`` or a checkpoint path."""

    def __init__(self, config: TrainConfig, resume: str | None = None, progress: bool = True):
        self.config = config
        self.resume = resume
        self.progress = progress
        self.state = ckpt.TrainState()
        self.grad_norm: torch.Tensor | None = None
        self.ema: LoraEma | None = None
        self.evaluator = None
        self.final_metrics: dict[str, float] = {}
        self._accum_index = 0

    # --- setup -----------------------------------------------------------------------

    def setup(self) -> None:
        """Loads data, model, optimizer and logging; restores a checkpoint when resuming."""
        self._setup_accelerator()
        self._check_output()
        self._setup_data()
        self._encode_validation_prompts()
        self._setup_model()
        self._setup_optimizer()
        self._setup_validation()
        self._setup_evaluation()
        if self.resume:
            self._restore(self.resume)
        self.log = RunLog(self.accelerator, self.config.output_dir, self.is_main, self.state.step)
        # Only a run that could start writes anything: a refused recipe leaves no trace.
        self._create_output()

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        config = self.config
        # bf16 / fp32 bases need no autocast: the base runs in its own dtype and PEFT
        # runs the fp32 LoRA branch in fp32. fp16 needs loss scaling, which accelerate's
        # fp16 mode (autocast + GradScaler) provides.
        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.schedule.grad_accum,
            mixed_precision="fp16" if config.dtype == "fp16" else "no",
            log_with=make_trackers(config.logging, Path(config.output_dir)) or None,
            # Only the main process renders validation grids (and fetches T5 for their
            # prompts on a first run) while the others wait in a collective: the
            # default 10 minutes can run out at 2048 px.
            kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=1))],
        )
        self.device = self.accelerator.device
        self.dtype = resolve_dtype(config.dtype)
        if self.dtype == torch.float16 and self.device.type == "cpu":
            raise UserError("dtype=fp16 needs a GPU; use dtype=fp32 (or bf16) on CPU")
        self.is_main = self.accelerator.is_main_process
        # Each rank its own stream (seed + rank), so LoRA dropout masks differ between
        # ranks; rank 0 keeps the single-process stream. DDP broadcasts rank 0's
        # initial weights, so the ranks still start from one adapter.
        set_seed(config.seed, device_specific=True)
        self._noise_generator = torch.Generator(device=self.device)

    def _setup_data(self) -> None:
        config = self.config
        self.dataset = TrainingSet(config.data.datasets(), eval_fraction=config.data.eval_fraction)
        self.sampler = BucketBatchSampler(
            self.dataset.buckets,
            config.data.batch_size,
            seed=config.seed,
            drop_last=config.data.drop_last,
            num_replicas=self.accelerator.num_processes,
            rank=self.accelerator.process_index,
            repeats=self.dataset.repeats,
            variants=self.dataset.variants,
            class_items=self.dataset.class_items,
            class_ratio=self.dataset.class_ratio,
        )
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=config.data.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            # Its own generator: a loader drawing its worker seed from the global RNG
            # would shift LoRA dropout after a resume.
            generator=torch.Generator().manual_seed(config.seed),
        )
        # The components prepare used (dataset.json), unless the recipe names others.
        use_components(config.model, config.components or self.dataset.main.manifest.components or None)
        self.empty_embeds = self.dataset.empty_embeds.to(self.device, self.dtype)
        self.empty_mask = self.dataset.empty_mask.to(self.device)
        self.dataset_fingerprint = dataset_fingerprint(self.dataset)
        if self.is_main:
            logger.info(
                "training on %s; epoch: %d samples in %d batches (all processes)",
                self.dataset.describe(), self.dataset.epoch_size, len(self.sampler.epoch_batches(0)),
            )
        if config.schedule.epochs is not None:
            self._resolve_epochs()

    def _resolve_epochs(self) -> None:
        """``schedule.epochs`` -> ``schedule.steps``, in a new config (the caller's is left as it was)."""
        config, schedule = self.config, self.config.schedule
        # Every epoch has the same batches per rank (same buckets, same sizes).
        steps = epochs_to_steps(schedule.epochs, len(self.sampler), schedule.grad_accum)
        try:
            resolved = dataclasses.replace(schedule, steps=steps)
        except ValueError as error:
            raise UserError(f"schedule.epochs={schedule.epochs} comes to {steps} steps: {error}") from None
        self.config = dataclasses.replace(config, schedule=resolved)
        if self.is_main:
            logger.info("%d epochs = %d optimizer steps", schedule.epochs, steps)

    def _setup_model(self) -> None:
        config, manifest = self.config, self.dataset.main.manifest
        try:
            transformer = load_transformer(config.model, self.dtype)
            self.noise_scheduler = load_noise_scheduler(config.model)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot load model {config.model!r} ({error}); set model= to a PixArt-Sigma folder or hub id") from None
        scale, text = model_vae_scaling_factor(config.model), model_text_fingerprint(config.model)
        for part in self.dataset.parts:
            check_fits_model(transformer.config, part.manifest, part.cache.root, scale, text)
        # `resolution` is the main dataset's (validation renders at it, the adapter
        # records it). Extra datasets may come from other bucket tables: that is
        # multi-resolution training, and a batch still holds one shape.
        if config.resolution is not None and config.resolution != manifest.resolution:
            raise UserError(
                f"the recipe trains at {config.resolution} px but {config.data.path} was prepared at {manifest.resolution} px; "
                f"re-run 'pixart-tune prepare' with --resolution {config.resolution}, or set resolution={manifest.resolution}"
            )
        if self.noise_scheduler.config.prediction_type != "epsilon":
            raise UserError(f"{config.model} predicts {self.noise_scheduler.config.prediction_type!r}; this trainer trains epsilon-prediction PixArt-Sigma")
        self.lora = config.lora
        check_lora_targets(self.lora, (name for name, _ in transformer.named_modules()), config.model)
        inject_lora(transformer, self.lora)
        if config.init_adapter is not None:
            self._load_init_adapter(transformer, config.init_adapter)
        checkpointing = self._checkpointing()
        self.checkpointed_blocks = speed.enable_checkpointing(transformer, checkpointing)
        if config.lora_compute_dtype == "base":
            set_lora_compute_dtype(transformer, self.dtype)
        transformer.train()
        self.transformer = transformer.to(self.device)
        if config.compile:
            speed.compile_blocks(self.transformer, self.device)
        # The schedule's tables live on the device, so noising a batch copies nothing.
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.num_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.latent_channels = manifest.latent_channels
        try:
            self.loss = TrainingLoss(
                config.diffusion, config.data, self.noise_scheduler, self.dtype, (self.empty_embeds, self.empty_mask),
                conditions=functools.partial(resolve_parts(config.model).family.micro_conditions, transformer.config),
            )
        except ValueError as error:
            raise UserError(str(error)) from None

    def _checkpointing(self) -> speed.CheckpointSetting:
        """The recipe's gradient checkpointing; ``auto`` is what plan predicts fits memory_budget_gb."""
        if self.config.gradient_checkpointing != "auto":
            return self.config.gradient_checkpointing
        from pixart_tune.training.autoplan import describe, resolve_auto
        from pixart_tune.training.memory import resolution_of

        resolved, choice = resolve_auto(self.config, resolution_of(self.config))
        verdict = "fits" if choice.fits else "does not fit even so"
        logger.info(
            "gradient_checkpointing auto: %s (predicted peak %.1f GiB, %s the %g GiB budget)",
            describe(choice.checkpointing), choice.plan.peak_gib, verdict, self.config.memory_budget_gb,
        )
        return resolved.gradient_checkpointing

    def _load_init_adapter(self, transformer: torch.nn.Module, path: Path) -> None:
        load_into(
            transformer, read_lora(path), source=f"init_adapter {path}", target="the lora section",
            advice="copy its lora settings into the recipe",
        )

    def _setup_optimizer(self) -> None:
        config = self.config
        self.params = trainable_parameters(self.transformer)
        optimizer = build_optimizer(self.params, config.optim, self.device)
        if self.is_main:
            for line in optimizer_advice(config.optim, config.schedule.lr_scheduler):
                logger.warning("%s", line)
        self.lr_scheduler = build_lr_scheduler(optimizer, config.schedule.lr_scheduler, config.schedule.warmup_steps, config.schedule.steps)
        # The LR schedule is stepped by hand once per optimizer step: accelerate's
        # wrapper would step it once per process.
        self.model, self.optimizer = self.accelerator.prepare(self.transformer, optimizer)
        set_optimizer_mode(self.optimizer, True)
        if config.ema.enabled:
            self.ema = LoraEma(self.params, config.ema)

    def _encode_validation_prompts(self) -> None:
        """T5 for the validation prompts, alone on the device: before the transformer loads."""
        self._validation_prompts = None
        if self.config.validation.prompts and self.is_main:
            self._validation_prompts = encode_prompts(
                self.config.model, self.config.validation.prompts, self.device, self.dataset.main.manifest.max_tokens
            )

    def _setup_validation(self) -> None:
        """The validation pipeline around the trained transformer; its VAE waits on the CPU."""
        self.validator = None
        if self._validation_prompts is None:
            return
        self.validator = Validator(
            self.config.validation, self.config.model, self.transformer, self.device, self.dtype, prompts=self._validation_prompts,
            resolution=self.dataset.main.manifest.resolution, negative=(self.empty_embeds, self.empty_mask),
        )

    def _setup_evaluation(self) -> None:
        """The held-out loss at fixed timesteps and noise (main process), when the recipe holds images out."""
        from pixart_tune.training.dataset import CachedDataset, check_compatible
        from pixart_tune.training.evaluation import Evaluator

        config, held, indices = self.config, self.dataset.eval_part, self.dataset.held_out
        if config.data.eval is not None:
            held, indices = CachedDataset(config.data.eval), None
            check_compatible([self.dataset.main, held])
        if held is None:
            return
        try:
            evaluator = Evaluator(held, indices, config.evaluation, self.num_timesteps, batch_size=config.data.batch_size)
        except ValueError as error:
            raise UserError(str(error)) from None
        if self.is_main:
            self.evaluator = evaluator
            logger.info("evaluation: %d held-out image(s) x %d timesteps every %s", len(self.evaluator.indices),
                        len(self.evaluator.timesteps), f"{config.evaluation.every} steps" if config.evaluation.every else "run (at the end)")

    def _check_output(self) -> None:
        """Refuses an output_dir that holds a run, before anything loads."""
        out = Path(self.config.output_dir)
        check_output_dir(out, resuming=bool(self.resume))
        if self.resume and self.is_main:
            ckpt.remove_stale(out)
        # Every process checks before the main one writes anything (_create_output):
        # a slower rank would otherwise find the main one's config.yaml and refuse.
        self.accelerator.wait_for_everyone()

    def _create_output(self) -> None:
        """output_dir with the resolved recipe (config.yaml) and the TensorBoard log."""
        out = Path(self.config.output_dir)
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_yaml(self.config, out / RUN_CONFIG)
        self.log.start(self.config)
        self.accelerator.wait_for_everyone()

    def _restore(self, resume: str) -> None:
        out = self.config.output_dir
        checkpoint = ckpt.load_latest(out) if resume == "latest" else ckpt.load_checkpoint(ckpt.resolve_resume(resume, out))
        path = checkpoint.path
        ckpt.check_same_lora(checkpoint, self.lora)
        if checkpoint.state.step > self.config.schedule.steps:
            raise UserError(f"{path} is at step {checkpoint.state.step}, past schedule.steps={self.config.schedule.steps}; raise schedule.steps to train on")
        if len(checkpoint.rng) != self.accelerator.num_processes:
            raise UserError(f"{path} was written by {len(checkpoint.rng)} process(es); resume it with that many")
        load_into(self.transformer, checkpoint.adapter, source=f"checkpoint {path}")
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.lr_scheduler.load_state_dict(checkpoint.lr_scheduler)
        if checkpoint.grad_scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(checkpoint.grad_scaler)
        # A schedule-free checkpoint holds its evaluation point; training goes on from its training point.
        set_optimizer_mode(self.optimizer, True)
        if self.ema is not None:
            if checkpoint.ema is None:
                logger.warning("%s holds no EMA (ema.enabled was off then): the average starts from its weights", path)
                self.ema = LoraEma(self.params, self.config.ema)
            else:
                self.ema.load_state_dict(checkpoint.ema)
        self.state = checkpoint.state
        ckpt.restore_rng(checkpoint.rng[self.accelerator.process_index])
        if self.is_main:
            logger.info("resumed from %s at step %d", path, self.state.step)

    # --- the loop --------------------------------------------------------------------

    def train(self) -> Path:
        """Trains to ``schedule.steps``; returns the final adapter folder."""
        config = self.config
        total = config.schedule.steps
        bar = tqdm(total=total, initial=self.state.step, desc="train", unit="step", disable=not (self.progress and self.is_main), dynamic_ncols=True)
        batches = self._batches()
        window = Window(self.device)
        # Lines logged mid-run (validation) print above the bar instead of through it.
        with logging_redirect_tqdm():
            if self.evaluator is not None and self.state.step == 0:
                self.evaluate()  # the base model's held-out loss: where the curve starts
            self._loop(bar, batches, window, total)
        bar.close()
        self._check_finite(window)
        if self.evaluator is not None and (not config.evaluation.every or total % config.evaluation.every):
            self.evaluate()
        if self.validator is not None and (not config.validation.every or total % config.validation.every):
            self.validate()
        adapter = self.save_adapter()
        self.plot_loss()
        return adapter

    def _loop(self, bar, batches: Iterator[Batch], window: Window, total: int) -> None:
        config = self.config
        while self.state.step < total:
            batch = next(batches)
            loss = self.train_step(batch)
            window.add(loss, len(batch))
            if not self.accelerator.sync_gradients:
                continue  # mid-accumulation: no optimizer step happened
            bar.update(1)
            step = self.state.step
            if step % config.logging.every == 0 or step == total:
                self._log(window, bar)
            # Judged before the checkpoint: a run killed right after it resumes with this step's
            # held-out loss and grid already written, not skipped.
            if self.evaluator is not None and config.evaluation.every and step % config.evaluation.every == 0:
                self.evaluate()
            if config.validation.every and step % config.validation.every == 0:
                self.validate()
            if config.checkpoint.every and step % config.checkpoint.every == 0 and step < total:
                self._check_finite(window)
                self.save_checkpoint()

    def train_step(self, batch: Batch) -> torch.Tensor:
        """One micro-step on a device batch; returns the (detached) loss tensor.

        On the last micro-step of an accumulation it clips, steps the optimizer and
        the LR schedule and counts ``state.step``; ``accelerator.sync_gradients`` says
        whether that happened.
        """
        with self.accelerator.accumulate(self.model):
            loss = self.compute_loss(batch)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                if self.config.optim.max_grad_norm is not None:
                    self.grad_norm = self.accelerator.clip_grad_norm_(self.params, self.config.optim.max_grad_norm)
                self.optimizer.step()
                # fp16: a step the loss scaler skipped (inf/NaN gradients while it
                # finds its scale) changed no weight, so the LR schedule waits too.
                if not self.optimizer.step_was_skipped:
                    self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator.sync_gradients:
            self.state.step += 1
            self._accum_index = 0
            if self.ema is not None:
                self.ema.step(self.state.step)
        else:
            self._accum_index += 1
        return loss.detach()

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        """Noise, timesteps and caption dropout drawn from the micro-step's own generator."""
        return self.loss.batch_loss(self.model, batch, self._generator())

    def loss_for(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The training loss of given latents, noise, timesteps and text (no randomness, weight 1, no mask)."""
        return self.loss.loss(self.model, latents, noise, timesteps, embeds, mask)

    def _generator(self) -> torch.Generator:
        # Seeded from (seed, micro-step, rank): a resumed run draws exactly the noise
        # the uninterrupted one would have, and ranks never draw the same noise.
        micro = self.state.step * self.config.schedule.grad_accum + self._accum_index
        key = f"{self.config.seed}:{micro}:{self.accelerator.process_index}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        return self._noise_generator.manual_seed(seed)

    def next_batch(self) -> Batch:
        """The next training batch on the device (for driving ``train_step`` directly)."""
        if not hasattr(self, "_batch_iter"):
            self._batch_iter = self._batches()
        return next(self._batch_iter)

    def _batches(self) -> Iterator[Batch]:
        """Device batches forever, epoch after epoch, keeping the data-order position."""
        while True:
            self.sampler.set_epoch(self.state.epoch, self.state.batch_in_epoch)
            for batch in self.loader:
                self.state.batch_in_epoch += 1
                yield batch.to(self.device, self.dtype)
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # --- logging, validation, saving -------------------------------------------------

    def _log(self, window: Window, bar) -> None:
        """The one place the loop waits for the device: every logging.every steps."""
        loss = self.accelerator.reduce(window.loss_sum, reduction="mean").item() / max(window.count, 1)
        seconds = time.perf_counter() - window.start
        samples_per_s = window.samples * self.accelerator.num_processes / max(seconds, 1e-9)
        window.reset()
        if not math.isfinite(loss):
            self._fail_nan()
        lr = self.lr_scheduler.get_last_lr()[0]
        grad_norm = float(self.grad_norm) if self.grad_norm is not None else float("nan")
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        values = {
            "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
            "train/samples_per_s": samples_per_s, "train/peak_memory_gb": peak_memory_gb(self.device),
        }
        self.log.scalars(values, self.state.step, series={"train/loss": plots.TRAIN})

    def _check_finite(self, window: Window) -> None:
        """A NaN stops the run before it can be saved over a good checkpoint."""
        if window.count:
            total = self.accelerator.reduce(window.loss_sum, reduction="sum").item()
            if not math.isfinite(total):
                self._fail_nan()
        if not torch.stack([torch.isfinite(p).all() for p in self.params]).all():
            self._fail_nan()

    def _fail_nan(self) -> None:
        kept = ckpt.list_checkpoints(self.config.output_dir)
        last = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
        raise UserError(
            f"the loss became NaN/inf near step {self.state.step}; nothing was saved after it and {last}. "
            "Lower optim.lr, keep optim.max_grad_norm set, use dtype=bf16 instead of fp16, or check the dataset "
            "(a NaN latent); then run again (with --resume latest to continue from the checkpoint)"
        )

    def metadata(self) -> dict[str, object]:
        """What the adapter's safetensors header records about this training."""
        return {
            "base_model": self.config.model,
            "steps": self.state.step,
            "resolution": self.dataset.main.manifest.resolution,
            "trigger_words": list(self.config.trigger_words),
            "dataset_fingerprint": self.dataset_fingerprint,
            "pixart_tune_version": __version__,
            **({"components": parts.components} if not (parts := resolve_parts(self.config.model)).own_components else {}),
            "family": parts.family.name,
            "training_config": to_dict(self.config),
            **({"ema": f"decay {self.config.ema.decay:g} from step {self.config.ema.start_step}"} if self.ema is not None else {}),
            **({"masked_images": masked} if (masked := sum(part.masked for part in self.dataset.parts)) else {}),
            **({"prior_preservation": self._prior_preservation()} if self.dataset.class_items else {}),
            **({"metrics": self._metrics()} if self.final_metrics else {}),
        }

    def _prior_preservation(self) -> str:
        spec = next(spec for spec in self.dataset.specs if spec.kind == "class")
        images = len(self.dataset.parts[self.dataset.specs.index(spec)])
        return f"{images} class images, {self.sampler.class_per_epoch} per epoch (ratio {spec.ratio:g}), loss weight {spec.loss_weight:g}"

    def save_checkpoint(self) -> Path | None:
        """Writes a resumable checkpoint (main process; every rank's RNG state gathered)."""
        from accelerate.utils import gather_object

        rng = gather_object([ckpt.rng_state()]) if self.accelerator.num_processes > 1 else [ckpt.rng_state()]
        path = None
        # A schedule-free optimizer is saved at its averaged point (its state says so); see _restore.
        set_optimizer_mode(self.optimizer, False)
        if self.is_main:
            path = ckpt.save_checkpoint(
                self.config.output_dir,
                transformer=self.accelerator.unwrap_model(self.model),
                lora=self.lora,
                metadata=self.metadata(),
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                state=self.state,
                rng=rng,
                config=self.config,
                keep_last=self.config.checkpoint.keep_last,
                grad_scaler=self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
                ema=self.ema.state_dict() if self.ema is not None else None,
            )
        set_optimizer_mode(self.optimizer, True)
        self.accelerator.wait_for_everyone()
        return path

    def save_adapter(self) -> Path:
        """The final adapter, OUTPUT_DIR/adapter (PEFT layout, metadata in the header).

        With an EMA that is the averaged weights, and the raw ones go to adapter_raw/.
        """
        root = Path(self.config.output_dir)
        out = root / ADAPTER_DIR
        if self.is_main:
            transformer = self.accelerator.unwrap_model(self.model)
            try:
                if self.ema is not None:
                    with contextlib.ExitStack() as raw:
                        raw.callback(set_optimizer_mode, self.optimizer, True)
                        set_optimizer_mode(self.optimizer, False)
                        self._write_adapter(transformer, root / RAW_ADAPTER_DIR, dict(self.metadata(), weights="raw (the EMA is in adapter/)"))
                with self.judged_weights():
                    self._write_adapter(transformer, out, self.metadata())
            except Exception as error:
                if ckpt.is_disk_full(error):
                    again = (
                        "run again with --resume latest"
                        if ckpt.list_checkpoints(Path(self.config.output_dir))
                        else "run again (this run kept no checkpoint to resume from; set checkpoint.every to keep some)"
                    )
                    raise UserError(f"the disk is full: could not write {out} ({error}); free space and {again}") from None
                raise
        self.accelerator.wait_for_everyone()
        return out

    def _write_adapter(self, transformer: torch.nn.Module, out: Path, metadata: dict[str, object]) -> None:
        save_adapter(transformer, out, self.lora, metadata)
        if self.lora.type != "lora":  # a PEFT LoKr / LoHa folder is nothing ComfyUI reads
            write_comfyui_file(out)

    def cleanup(self) -> None:
        if self.validator is not None:
            self.validator.close()
        self.validator = None
        self.evaluator = None
        self.accelerator.end_training()


def epochs_to_steps(epochs: int, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps that see every batch of ``epochs`` epochs at least once."""
    return max(1, math.ceil(epochs * batches_per_epoch / grad_accum))


def run(config: TrainConfig, resume: str | None = None, progress: bool = True) -> Path:
    """Sets up, trains and cleans up; returns the final adapter folder."""
    if not progress:
        quiet_loading()
    trainer = Trainer(config, resume=resume, progress=progress)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
