"""`run_training`: ArtQuant's RAD-based fine-tuning with peft (LoRA) and accelerate (one GPU, DDP, ZeRO, FSDP).

    artquant train config.yaml learning_rate=1e-5                      # one process
    accelerate launch -m artquant.cli train config.yaml                # as configured by `accelerate config`
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..scorer.checkpoint import NON_LORA_WEIGHTS, load_checkpoint, resolve_device_and_dtype, save_processing_files
from ..scorer.levels import ARTQUANT_LEVELS
from .checkpoints import ResumeError, latest_checkpoint, restore_training_checkpoint, save_training_checkpoint
from .config import ConfigError, TrainingConfig, load_config
from .data import ANSWER_PREFIX, ConversationDataset, DataError, SplitByTask, mix_datasets
from .evaluate import evaluate_scorer, read_scored_images, scorer_for_network, write_report
from .loss import ArtQuantLoss

logger = logging.getLogger(__name__)

NON_LORA_SAFETENSORS, REFERENCE_NON_LORA = NON_LORA_WEIGHTS  # ours, and the reference's pickle
PEFT_PREFIX = "base_model.model."  # where peft puts the wrapped model's own parameter names


class NonFiniteLoss(RuntimeError):
    """The loss, the gradient norm or a weight became NaN or infinite; the run stops without using it."""


class SeededShuffle(torch.utils.data.Sampler):
    """A fresh permutation per epoch from `seed + epoch`, so a resumed run sees the same order."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def prepare_for_training(network, config: TrainingConfig):
    """LoRA (or full fine-tuning) and the trainable vision parts as configured; trainable weights in fp32."""
    network.config.use_cache = False
    if config.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.lora_target, bias="none", task_type="CAUSAL_LM")
        network = get_peft_model(network, lora)
        network.peft_config["default"].base_model_name_or_path = config.base_model
    else:
        network.requires_grad_(True)
    inner = network.get_base_model() if config.lora else network
    inner.model.visual_abstractor.requires_grad_(config.tune_visual_abstractor)
    inner.model.vision_model.requires_grad_(config.tune_vision_model)
    for parameter in network.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()  # fp32 master weights; autocast runs the matmuls in bf16/fp16
    if config.gradient_checkpointing:
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    network.train()
    return network


def build_network(config: TrainingConfig, dtype: torch.dtype):
    """The base checkpoint prepared for training, and the loaded checkpoint (tokenizer, image config)."""
    checkpoint = load_checkpoint(config.base_model, dtype=dtype)
    return prepare_for_training(checkpoint.model, config), checkpoint


def save_release(network, checkpoint, out: str | Path, lora: bool, reference_layout: bool,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """A release `ArtQuantScorer.from_pretrained(out, base=...)` loads: the peft adapter (safetensors), the trained
    vision model / abstractor as `non_lora_trainables.safetensors` (plain model keys), config, tokenizer,
    preprocessor; a full checkpoint when trained without LoRA. `reference_layout` adds the reference's
    `non_lora_trainables.bin` (keys `base_model.model.*`). `state_dict`: gathered weights (ZeRO-3 / FSDP)."""
    out = Path(out)
    state = state_dict if state_dict is not None else network.state_dict()
    trained = [name for name, p in network.named_parameters() if p.requires_grad]
    broken = [name for name in trained if name in state and not bool(torch.isfinite(state[name]).all())]
    if broken:
        raise NonFiniteLoss(f"not writing a release to {out}: {len(broken)} trained weights hold NaN or infinity "
                            f"(e.g. {broken[0]}).")
    out.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(out, state_dict=state)  # LoRA: adapter_config.json + adapter_model.safetensors
    if lora:
        network.get_base_model().config.save_pretrained(out)
        non_lora = {name.removeprefix(PEFT_PREFIX): state[name].detach().contiguous().cpu()
                    for name in trained if "lora_" not in name}
        if non_lora:
            save_file(non_lora, str(out / NON_LORA_SAFETENSORS))
            if reference_layout:
                torch.save({PEFT_PREFIX + k: v.clone() for k, v in non_lora.items()}, out / REFERENCE_NON_LORA)
    save_processing_files(checkpoint, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------
class RunningTerms:
    """Sums of the loss terms since the last log line, for averaged logging."""

    def __init__(self):
        self.sums, self.count, self.samples, self.start = {}, 0, 0, time.perf_counter()

    def add(self, terms: dict[str, float], samples: int) -> None:
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += 1
        self.samples += samples

    def flush(self) -> dict[str, float]:
        logs = {name: total / max(self.count, 1) for name, total in self.sums.items()}
        logs["samples_per_second"] = self.samples / max(time.perf_counter() - self.start, 1e-9)
        self.__init__()
        return logs


def _accelerator(config: TrainingConfig):
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available

    tracking = config.tensorboard and is_tensorboard_available()
    return Accelerator(
        mixed_precision={"fp32": "no"}.get(config.precision, config.precision),
        log_with="tensorboard" if tracking else None,
        project_dir=config.output_dir,
    ), tracking


def train(config: TrainingConfig) -> Path:
    """Runs (or resumes) the training described by `config`; returns the release folder."""
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_scheduler

    # Data first: a bad file is refused in seconds, before a 7B model is loaded.
    samples = mix_datasets(config.data, config.seed)
    eval_set = read_scored_images(config.eval_data) if config.eval_data is not None and config.eval_steps else None
    accelerator, tracking = _accelerator(config)
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    _, dtype = resolve_device_and_dtype("cpu", config.precision)
    network, checkpoint = build_network(config, dtype)
    tokenizer = checkpoint.tokenizer

    dataset = ConversationDataset(samples, tokenizer, checkpoint.image_config, config.max_length)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.batch_size, sampler=SeededShuffle(len(dataset), config.seed),
        collate_fn=SplitByTask(tokenizer.unk_token_id), num_workers=config.num_workers,
        # Its own generator: starting an epoch must not draw from the global RNG that dropout uses, or a resumed
        # run (which starts its epoch after restoring that RNG) would drop different units.
        generator=torch.Generator().manual_seed(config.seed),
    )
    level_ids = [tokenizer.word_token_id(w) for w in ARTQUANT_LEVELS]
    model = ArtQuantLoss(network, level_ids, tokenizer.encode(ANSWER_PREFIX), config.loss_weights)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    # Our own checkpoints (training/checkpoints.py) hold full tensors: with DeepSpeed or FSDP the optimizer's state
    # is sharded in their own (pickled) formats, which a resume must not load.
    checkpoints = accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if not checkpoints and config.save_steps:
        raise ConfigError("resumable checkpoints are written for one process or DDP; with DeepSpeed or FSDP set "
                          "save_steps: 0 (the release is still written at the end).")
    accelerator.print(f"{len(dataset)} samples, {accelerator.num_processes} process(es), {steps_per_epoch} steps per "
                      f"epoch, {total_steps} steps.")

    output_dir.mkdir(parents=True, exist_ok=True)
    step = 0
    resume_from = latest_checkpoint(output_dir) if config.resume and checkpoints else None
    if resume_from is not None:
        step = restore_training_checkpoint(resume_from, accelerator, model, optimizer, scheduler)
        accelerator.print(f"Resuming from {resume_from} at step {step}.")
    if tracking:
        accelerator.init_trackers("artquant", config={k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))})
    evaluation = _evaluation_hook(config, eval_set, checkpoint, accelerator, model)

    def save_resumable(step: int) -> None:
        broken = next((n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())),
                      None)
        _stop_if_any_process(accelerator, broken and f"the trained weight {broken} holds NaN or infinity.")
        save_training_checkpoint(accelerator, model, optimizer, scheduler, output_dir, step, config.save_total_limit)

    running, skipped = RunningTerms(), 0
    progress = tqdm(total=total_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, done_in_epoch * config.gradient_accumulation_steps)
        group: list[dict] = []
        for index, batch in enumerate(batches, done_in_epoch * config.gradient_accumulation_steps):
            group.append(batch)
            if len(group) < config.gradient_accumulation_steps and index + 1 < len(loader):
                continue
            try:
                skipped += _optimizer_step(accelerator, model, optimizer, scheduler, group, config, running)
                if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < total_steps:
                    save_resumable(step + 1)
            except NonFiniteLoss as error:
                kept = latest_checkpoint(output_dir)
                raise NonFiniteLoss(f"stopped at step {step + 1}: {error} The weights were not updated and no release "
                                    f"was written; the last good checkpoint is {kept or 'none (no checkpoint yet)'}. "
                                    "Lower learning_rate, use precision fp32 or bf16, or check the data.") from None
            group = []
            step += 1
            progress.update(1)
            if step % config.logging_steps == 0 or step == total_steps:
                logs = {**_across_processes(accelerator, running.flush()), "lr": scheduler.get_last_lr()[0],
                        "epoch": step / steps_per_epoch}
                progress.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}", lr=f"{logs['lr']:.2e}")
                accelerator.log(logs, step=step)
                if accelerator.is_main_process:
                    with (output_dir / "train_log.jsonl").open("a") as handle:
                        handle.write(json.dumps({"step": step, **logs}) + "\n")
                    logger.info("step %d: %s", step, json.dumps({k: round(v, 6) for k, v in logs.items()}))
            if config.eval_steps and step % config.eval_steps == 0:
                evaluation(step)
            if step >= total_steps:
                break
    progress.close()
    if skipped:
        logger.warning("%d samples were skipped because their images could not be read.", skipped)
    if checkpoints:
        try:
            save_resumable(step)
        except NonFiniteLoss as error:
            raise NonFiniteLoss(f"stopped at the end: {error} No release was written; the last good checkpoint is "
                                f"{latest_checkpoint(output_dir)}.") from None
    release = output_dir / "release"
    state = accelerator.get_state_dict(model)  # every process takes part: ZeRO-3 / FSDP gather the shards here
    if accelerator.is_main_process:
        state = {name.removeprefix("network."): tensor for name, tensor in state.items()}
        save_release(accelerator.unwrap_model(model).network, checkpoint, release, config.lora, config.reference_layout,
                     state)
    accelerator.print(f"Release written to {release}")
    if config.eval_steps and step % config.eval_steps:
        evaluation(step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return release


def _across_processes(accelerator, logs: dict[str, float]) -> dict[str, float]:
    """Loss terms averaged over the processes, throughput summed (every process must call this)."""
    if accelerator.num_processes == 1:
        return logs
    names = sorted(logs)
    values = accelerator.reduce(torch.tensor([logs[n] for n in names], device=accelerator.device), reduction="mean")
    merged = dict(zip(names, values.tolist()))
    if "samples_per_second" in merged:
        merged["samples_per_second"] *= accelerator.num_processes
    return merged


def _optimizer_step(accelerator, model, optimizer, scheduler, group, config, running) -> int:
    """Forward/backward over the micro-batches of one optimizer step; returns how many samples were skipped."""
    skipped, non_finite = 0, {}
    usable = [b for b in group if b["num_samples"]]
    for batch in group:
        for message in batch["skipped"]:
            logger.warning("skipped a sample: %s", message)
        skipped += len(batch["skipped"])
    for index, batch in enumerate(usable):
        sync = index == len(usable) - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            terms = model(score=batch["score"], description=batch["description"])
            accelerator.backward(terms["loss"] / len(usable))
        terms = {k: float(v.detach()) for k, v in terms.items()}
        if not math.isfinite(terms["loss"]):
            non_finite = terms
        running.add(terms, batch["num_samples"])
    _stop_if_any_process(accelerator, non_finite and f"the loss is {non_finite['loss']} ({json.dumps(non_finite)}).")
    if usable:
        if config.max_grad_norm:
            norm = float(accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm))
            # With fp16 an infinite norm is the grad scaler's business: it skips the step and lowers its scale.
            if accelerator.scaler is None:
                _stop_if_any_process(accelerator, not math.isfinite(norm) and f"the gradient norm is {norm}.")
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return skipped


def _stop_if_any_process(accelerator, problem: str | bool | None) -> None:
    """Raises NonFiniteLoss on every process when any process has a `problem` (every process must call this)."""
    if accelerator.num_processes > 1:
        stop = accelerator.reduce(torch.tensor(float(bool(problem)), device=accelerator.device), reduction="sum")
        if float(stop) and not problem:
            problem = "another process got a NaN or infinite loss."
    if problem:
        raise NonFiniteLoss(problem)


def _evaluation_hook(config: TrainingConfig, eval_set, checkpoint, accelerator, model):
    """A callable(step) that scores the held-out images with the current weights and logs the metrics."""
    if eval_set is None:
        return lambda step: None
    images, scores, unusable = eval_set

    def run(step: int) -> None:
        if not accelerator.is_main_process:
            return
        network = accelerator.unwrap_model(model).network
        network.eval()
        with accelerator.autocast():
            report = evaluate_scorer(scorer_for_network(network, checkpoint, accelerator.device), images, scores,
                                     batch_size=config.batch_size)
        network.train()
        metrics = {f"eval/{k}": v for k, v in report["metrics"].items() if isinstance(v, (int, float))}
        accelerator.log(metrics, step=step)
        logger.info("eval at step %d: %s", step, json.dumps(report["metrics"]))
        report["failed"] = unusable + report["failed"]
        folder = Path(config.output_dir) / "eval" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        write_report(report, folder / "report.json")

    return run


def run_training(config_path: str | None, overrides: list[str] = ()) -> int:
    """`artquant train CONFIG [key=value ...]`: 0 on success, 2 on a config or data problem (message printed)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path, list(overrides))
        train(config)
    except (ConfigError, DataError, ResumeError) as error:
        logger.error("%s", error)
        return 2
    except NonFiniteLoss as error:
        logger.error("%s", error)
        return 1
    return 0
