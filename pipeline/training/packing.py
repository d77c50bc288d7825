"""Packed trials: several trials train in one forward and one backward over one frozen base.

Each trial keeps everything that is its own: its PEFT model (built on a copy of the base's module
tree that shares the base's weight tensors, so to the Trainer, the callbacks, the checkpoints and
the registry it is an ordinary single-adapter PeftModel), its Trainer, optimizer, scheduler,
gradient clipping, data order, RNG, evaluations and MLflow run. Each runs in its own thread.

Only the training forward and backward are shared. A trial's thread hands its micro-batch to the
`Pack`; once every training trial has handed one in, the batches are concatenated and run once
through the *router*, a third copy of the module tree whose LoRA-targeted linear layers add to
the shared base output each row's own trial's LoRA output (its A, B, scaling and dropout). The
logits are split back per trial and each thread computes its own loss (normalised by its own token
count, as alone). The backward is one `torch.autograd.backward` over every trial's loss: no loss
depends on another trial's adapter, so each adapter's gradient is its own trial's.

Threads take turns: one runs Python at a time, and the one whose turn it is has its own
process-wide state installed: torch's RNG (dropout masks, data order), Python's and NumPy's,
and accelerate's GradientState (a process-wide dict the Trainer writes every micro-step). In the
shared forward each trial's dropout draws from that trial's RNG state. So a trial sees the data
order, dropout masks and arithmetic it would alone (tests/training/test_packing.py measures the
difference: bit-identical where the base's kernels give the same rows for a larger batch).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import torch
from accelerate.state import GradientState
from torch import nn

from pipeline.training.router import Router, lora_layers_by_path, share_weights

log = logging.getLogger("pipeline")

# The LoRA variants whose forward is plain `B(A(dropout(x))) * scaling` on an unchanged base.
PACKABLE_INITS = ("default", "gaussian", "eva")
_LOCAL = threading.local()
_PROCESS = psutil.Process()  # this process, for its resident set after each shared forward


def unpackable(config: Any) -> str | None:
    """Why a trial of this config cannot share a pack (it then trains alone), or None."""
    lora, train = config.lora, config.train
    reasons = {
        "lora.use_dora (DoRA has its own forward)": lora.use_dora,
        f"lora.init: {lora.init} (it rewrites the shared base weights)": lora.init not in PACKABLE_INITS,
        f"lora.bias: {lora.bias} (it trains the shared base's biases)": lora.bias != "none",
        "train.multi_gpu": train.multi_gpu,
        "train.gradient_checkpointing (the recompute would redraw dropout masks)": train.gradient_checkpointing,
        "train.use_liger_kernel (its loss is fused into the forward)": train.use_liger_kernel,
        f"train.batching: {train.batching} (a packed batch is padded)": train.batching == "padding_free",
    }
    return next((reason for reason, refused in reasons.items() if refused), None)


def pack_key(config: Any) -> tuple:
    """What trials in one pack share: the base, the data, the layers LoRA targets and how the
    batch reaches the model. Everything else (rank, alpha, dropout, learning rate, batch size,
    schedule, seed, steps, evaluation) is each trial's own."""
    train = config.train
    return (
        config.model.model_dump_json(),
        config.data.model_dump_json(),
        str(config.lora.target_modules),
        train.precision,
        train.batching,
        train.prompt_logits,
    )


def current() -> Slot | None:
    """The pack slot this thread trains in, or None (a trial trained alone)."""
    return getattr(_LOCAL, "slot", None)


@dataclass
class ThreadState:
    """The process-wide state a trial's thread owns while it has its turn."""

    cpu_rng: torch.Tensor | None = None
    cuda_rng: torch.Tensor | None = None
    py_rng: Any = None
    np_rng: Any = None
    gradient_state: dict[str, Any] | None = None

    def capture(self) -> None:
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        self.py_rng, self.np_rng = random.getstate(), np.random.get_state()
        self.gradient_state = dict(GradientState._shared_state)

    def install(self) -> None:
        if self.cpu_rng is None:  # a new thread: its code seeds what it uses
            return
        self.set_torch_rng()
        random.setstate(self.py_rng)
        np.random.set_state(self.np_rng)
        GradientState._shared_state.clear()
        GradientState._shared_state.update(self.gradient_state or {})

    def set_torch_rng(self) -> None:
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng)

    def get_torch_rng(self) -> None:
        self.cpu_rng = torch.get_rng_state()
        if self.cuda_rng is not None:
            self.cuda_rng = torch.cuda.get_rng_state()


@dataclass(eq=False)
class Slot:
    """One trial's place in a pack."""

    pack: Pack
    number: int
    state: ThreadState = field(default_factory=ThreadState)
    phase: str = "setup"  # setup (joined, not training yet) -> training -> done
    layers: dict[str, Any] = field(default_factory=dict)  # module path -> the trial's LoRA layer
    request: tuple[str, Any] | None = None  # ("forward", batch) | ("backward", loss), until served
    result: Any = None
    error: BaseException | None = None

    def tree(self, base: nn.Module) -> nn.Module:
        """The base's module tree for this trial's adapter (weights shared)."""
        self.pack.use(base)
        return share_weights(base)

    @contextlib.contextmanager
    def training_with(self, trainer: Any) -> Iterator[None]:
        """While the Trainer trains: its forwards and backwards go through the pack."""
        model = trainer.model
        inner = model.base_model.model  # the trial's copy of the base, inside PEFT's wrappers
        self.layers = lora_layers_by_path(model)
        original = type(inner).forward
        slot = self

        def forward(*args: Any, **kwargs: Any) -> Any:
            if args or not (inner.training and torch.is_grad_enabled()):
                return original(inner, *args, **kwargs)
            return slot.pack.forward(slot, kwargs)

        accelerator = trainer.accelerator

        def backward(loss: torch.Tensor, **kwargs: Any) -> None:
            # What accelerate's backward does for one process without DeepSpeed, the last step
            # shared with the pack.
            loss = loss / accelerator.gradient_accumulation_steps
            if accelerator.scaler is not None:
                loss = accelerator.scaler.scale(loss)
            slot.pack.backward(slot, loss)

        inner.forward, accelerator.backward = forward, backward
        self.phase = "training"
        try:
            yield
        finally:
            self.phase = "done"
            del inner.forward, accelerator.backward
            self.pack.run_if_ready()  # the others may be waiting for this trial's batch


class Pack:
    """Trials training together over one base model on one device (see the module's docstring)."""

    def __init__(self, size: int) -> None:
        self.base: nn.Module | None = None
        self.size = size  # the most trials in one forward; lowered when a pack runs out of memory
        self.cond = threading.Condition()
        self.holder: object | None = None
        self.slots: list[Slot] = []
        self.router: Router | None = None
        self.peaks: dict[int, float] = {}  # trials in a forward -> the highest memory seen (GiB)
        self.shared_steps = 0  # forwards that served more than one trial
        # Admission (`admit`): what the trials in the pack share, whether one runs alone, how
        # many are in, who waits, and which pack this is (a new one each time it drains).
        self.key: Any = None
        self.alone = False
        self.members = 0
        self.queue: deque[object] = deque()
        self.generation = 0

    def use(self, base: nn.Module) -> None:
        """The base the pack's trials train on (a new one when the executor changed packs)."""
        if base is not self.base:
            self.base, self.router, self.peaks = base, None, {}

    # -- turns ---------------------------------------------------------------------------------

    def admit(self, key: Any, alone: bool) -> None:
        """Block until the pack can take a trial: at once while it trains trials of the same
        `key`; one that must run `alone`, or of another key, once it has drained. First come,
        first served (a Ray worker's trials arrive as the driver dispatches them)."""
        ticket = object()

        def admissible() -> bool:
            if self.queue[0] is not ticket:
                return False
            return self.members == 0 or (not alone and not self.alone and key == self.key)

        with self.cond:
            self.queue.append(ticket)
            self.cond.wait_for(admissible)
            self.queue.popleft()
            if self.members == 0:
                self.key, self.alone, self.generation = key, alone, self.generation + 1
            self.members += 1
            self.cond.notify_all()

    def discharge(self) -> None:
        """An admitted trial is over."""
        with self.cond:
            self.members -= 1
            self.cond.notify_all()

    def join(self) -> Slot:
        """A slot for the calling thread (which then trains in this pack)."""
        with self.cond:
            taken = {s.number for s in self.slots}
            slot = Slot(self, next(i for i in range(len(self.slots) + 1) if i not in taken))
            self.slots.append(slot)
        _LOCAL.slot = slot
        return slot

    def leave(self, slot: Slot) -> None:
        """The slot's trial is over: its thread gives up its turn for good."""
        slot.phase = "done"
        with self.cond:
            self.slots.remove(slot)
        self.run_if_ready()  # the others may have waited for this trial to start training
        with self.cond:
            if self.holder is slot:
                self.holder = None
            self.cond.notify_all()
        _LOCAL.slot = None

    def enter(self, owner: object) -> None:
        """Wait for the turn, then install the owner's state (a slot's; the driver has none)."""
        with self.cond:
            self.cond.wait_for(lambda: self.holder is None)
            self.holder = owner
        if isinstance(owner, Slot):
            owner.state.install()

    def release(self, owner: object, save: bool = True) -> None:
        if save and isinstance(owner, Slot):
            owner.state.capture()
        with self.cond:
            if self.holder is owner:
                self.holder = None
            self.cond.notify_all()

    def wait(self, owner: object, ready: Callable[[], bool], save: bool = True) -> None:
        """Give up the turn until `ready()`, then take it back."""
        self.release(owner, save)
        with self.cond:
            self.cond.wait_for(lambda: self.holder is None and ready())
            self.holder = owner
        if isinstance(owner, Slot):
            owner.state.install()

    # -- shared steps --------------------------------------------------------------------------

    def forward(self, slot: Slot, batch: dict[str, Any]) -> Any:
        slot.request = ("forward", batch)
        return self._served(slot)

    def backward(self, slot: Slot, loss: torch.Tensor) -> None:
        slot.request = ("backward", loss)
        self._served(slot)

    def _served(self, slot: Slot) -> Any:
        slot.state.capture()  # before a shared forward moves the RNG states of its trials
        self.run_if_ready()
        self.wait(slot, lambda: slot.request is None, save=False)
        error, result, slot.error, slot.result = slot.error, slot.result, None, None
        if error is not None:
            raise error
        return result

    def run_if_ready(self) -> None:
        """Once every training trial has a request in: run them (backwards first, so the trials
        that stepped join the next forward together). Called by whoever has the turn."""
        members = [s for s in self.slots if s.phase == "training"]
        starting = any(s.phase == "setup" for s in self.slots)  # joins the next forward: wait
        if not members or starting or any(s.request is None for s in members):
            return
        backwards = [s for s in members if s.request is not None and s.request[0] == "backward"]
        group = backwards or members
        try:
            if backwards:
                self._backward(group)
            else:
                for start in range(0, len(group), self.size):
                    self._forward_or_apart(group[start : start + self.size])
        finally:
            for s in group:
                s.request = None

    def _backward(self, group: list[Slot]) -> None:
        try:
            torch.autograd.backward([s.request[1] for s in group if s.request is not None])
        except Exception as e:  # the graph is shared: each trial hears the error
            for s in group:
                s.error = e

    def _forward_or_apart(self, group: list[Slot]) -> None:
        """The group's forward; if it fails, each trial's alone (from the same RNG states), so
        only a trial that fails by itself is lost, and a pack out of memory gets smaller."""
        from pipeline.model.load import is_out_of_memory

        saved = [s.state.cpu_rng for s in group], [s.state.cuda_rng for s in group]
        try:
            self._forward(group)
            return
        except Exception as e:  # retried apart below; one alone hears its own
            if len(group) == 1:
                group[0].error = e
                return
            if is_out_of_memory(e):
                self.size = max(1, len(group) - 1)
                log.warning(f"a pack of {len(group)} ran out of memory: packs of {self.size} from now on")
                release_memory()
        for s, cpu, cuda in zip(group, *saved, strict=True):
            s.state.cpu_rng, s.state.cuda_rng = cpu, cuda
            try:
                self._forward([s])
            except Exception as e:  # this trial's own failure
                s.error = e

    def _forward(self, group: list[Slot]) -> None:
        if self.router is None:  # one per base (`use`)
            self.router = Router(self.base, list(group[0].layers))
        batches = [s.request[1] for s in group if s.request is not None]
        outputs = self.router.forward(batches, [(s.layers, s.state) for s in group])
        for slot, out in zip(group, outputs, strict=True):
            slot.result = out
        self._measure(len(group))
        if len(group) > 1:
            self.shared_steps += 1

    def _measure(self, n: int) -> None:
        self.peaks[n] = max(self.peaks.get(n, 0.0), memory_in_use_gb())

    def fits(self, n: int, limit_gb: float | None) -> bool:
        """Whether a pack of `n` trials is expected to fit in `limit_gb`, from the peaks measured
        so far: the largest pack's peak plus, per extra trial, the most one trial added."""
        if limit_gb is None or not self.peaks:
            return True
        sizes = sorted(self.peaks)
        top = sizes[-1]
        if n <= top:
            return self.peaks[top] <= limit_gb or n < top
        steps = [self.peaks[b] - self.peaks[a] for a, b in itertools.pairwise(sizes) if b == a + 1]
        per_trial = max(steps, default=self.peaks[top] / top)
        return self.peaks[top] + (n - top) * per_trial <= limit_gb


def on_gpu() -> bool:
    return torch.cuda.is_available()


def memory_in_use_gb() -> float:
    """Memory in use now: allocated on the GPU, else this process's resident set."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30
    return _PROCESS.memory_info().rss / 2**30


def memory_limit_gb() -> float:
    """What a pack may fill: 90 % of the GPU, else what is in use plus 90 % of what is free."""
    if torch.cuda.is_available():
        return 0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30
    return memory_in_use_gb() + 0.9 * psutil.virtual_memory().available / 2**30


def release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
