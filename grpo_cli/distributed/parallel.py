"""Several processes, on PyTorch's own engine: torchrun starts them, torch.distributed connects them.

`grpo train` under `torchrun --nproc-per-node N` (or several nodes with torchrun's
rendezvous arguments) splits each step's prompts across the processes. A group never
spans processes, so its normalization stays local and exact. With `ddp` every process
holds the whole model and DistributedDataParallel averages the gradients; with `fsdp`
FSDP2 shards weights, gradients and optimizer state across the processes (each
decoder layer its own unit) and gathers the weights for the length of a rollout.
Only rank 0 writes metrics, samples, checkpoints and the console. Outside torchrun
everything here is a no-op for a world of one.

Every rank samples in lockstep with a single-process run of the same recipe: it
draws its random numbers for all of the step's rows (as one process would), keeps
the draws for its own rows, and the ranks agree on when the step's last sequence
ends. So a 2-process run samples the same tokens as a 1-process run with the same
seed, and learns the same up to float rounding (tested on CPU with gloo).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from grpo_cli.model import logprobs  # its functions looked up at each call, where tests replace them
from grpo_cli.errors import UserError
from grpo_cli.distributed.world import World
from grpo_cli.model.calls import causal_lm
from grpo_cli.rollout.sampling import generate as run_generate
from grpo_cli.rollout.settings import Sampling


class PolicyPasses(torch.nn.Module):
    """Every use of a model as one module's forward, so DDP or FSDP2 can wrap it: the log-prob pass
    of a micro-batch (continuing from the step's `prompts` if given), the step's prompt pass
    (`step_prompts_of=` a rollout), or a rollout (`generate=` keyword arguments for rollout.generate)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, micro=None, temperature: float = 1.0, shared_prompts: bool = True,
                generate: dict | None = None, prompts=None, step_prompts_of=None, entropy_grad: bool = False):
        if generate is not None:
            return run_generate(self.model, **generate)
        if step_prompts_of is not None:  # a rollout: its prompts, run once (logprobs.step_prompts)
            return logprobs.step_prompts(self.model, step_prompts_of)
        return logprobs.micro_batch_logprobs(self.model, micro, temperature, shared_prompts, with_entropy=True,
                                             prompts=prompts, entropy_grad=entropy_grad)


class Parallel:
    """How the policy runs: alone, with gradients averaged by DDP, or sharded by FSDP2.

    `module` (a PolicyPasses) is what every pass goes through; `train_call` is what the
    update's forward calls (DDP's wrapper under ddp). Parameter names in its state dicts
    are the same under every strategy, so checkpoints move between them and world sizes.
    """

    def __init__(self, policy, world: World, strategy: str):
        self.policy, self.world = policy, world
        self.strategy = strategy if world.active else "single"
        self.module = PolicyPasses(policy.model)
        self.reference = PolicyPasses(policy.frozen_reference) if policy.frozen_reference is not None else None
        self.train_call = self.module
        if self.strategy == "fsdp":
            mesh = _mesh(world, policy.device)
            for passes in filter(None, (self.module, self.reference)):
                _shard(passes, mesh)
            self._unsharded = _AllUnsharded(self.module)
            self._reference_unsharded = _AllUnsharded(self.reference) if self.reference is not None else None
        elif self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [world.local_rank] if policy.device.type == "cuda" else None
            self.train_call = DistributedDataParallel(self.module, device_ids=device_ids)

    def sync_gradients(self, syncing: bool):
        """Context for one micro-batch's backward: gradients are averaged only on the last."""
        if self.strategy == "ddp" and not syncing:
            return self.train_call.no_sync()
        if self.strategy == "fsdp":
            self.module.set_requires_gradient_sync(syncing)
        return contextlib.nullcontext()

    def generate(self, tokenizer, prompts: list[str], sampling: Sampling, tools=None, lockstep: bool = True):
        """A rollout (rollout.generate) of this process's `prompts` through the module; under FSDP2
        the weights are gathered for it, unless an enclosing `gathered()` already did. LoRA is not
        folded into FSDP2's gathered weights: they are its buffers, not ours to swap. `lockstep`: the
        processes sample as one (a training step's); an evaluation's take different items, each alone."""
        sampling = replace(sampling, fold_lora=self.strategy != "fsdp")
        with self.gathered():
            return self.module(generate={"tokenizer": tokenizer, "prompts": prompts, "sampling": sampling,
                                         "world": self.world if lockstep else None, "tools": tools})

    def gathered(self, reference: bool = False):
        """Context: under FSDP2, every weight of the policy (or of the frozen reference copy) gathered,
        one collective, until it exits; re-entrant. Enter it around all of a phase's passes: each
        process may run a different number of them."""
        if self.strategy != "fsdp":
            return contextlib.nullcontext()
        return self._reference_unsharded if reference and self.reference is not None else self._unsharded

    def logprobs(self, rollout, batches: list, temperature: float, shared_prompts: bool, reference: bool) -> list:
        """Log-probs of every micro-batch ([n, c] each) under the policy or, with `reference`, the
        reference: the frozen copy, or the policy with its adapters disabled once for all the passes
        (inside `gathered(reference=True)` under FSDP2). With `shared_prompts` the step's prompts run
        once, for all the micro-batches."""
        module = self.reference if reference and self.reference is not None else self.module
        disabled = reference and self.reference is None
        with self.policy.reference() if disabled else contextlib.nullcontext():
            prompts = module(step_prompts_of=rollout) if shared_prompts else None
            return [module(micro, temperature, shared_prompts, prompts=prompts)[0] for micro in batches]

    def model_state(self) -> dict:
        """The policy's full state dict on the CPU, names as policy.model names them (collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = {name.removeprefix("model."): value for name, value in state.items()}
        # A tied weight (the output head sharing the embedding) is one parameter under two names; the
        # gathered copies no longer share storage, so keep the first name only, as save_pretrained would.
        seen, tied = set(), set()
        for name, parameter in self.policy.model.named_parameters(remove_duplicate=False):
            if id(parameter) in seen:
                tied.add(name)
            seen.add(id(parameter))
        return {name: value for name, value in state.items() if name not in tied}

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's full state, keyed by parameter names (collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.module, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))


def _mesh(world: World, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world.size,))


def _shard(passes: PolicyPasses, mesh) -> None:
    """FSDP2: each decoder layer its own unit, the rest (embeddings, norm, head) in the root."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(causal_lm(passes.model).base_model, "layers", None)
    if layers is None:
        raise UserError("distributed.strategy: fsdp needs a model whose decoder layers are at .model.layers "
                        "(Llama, Qwen, Mistral and most causal LMs); use strategy: ddp for this one.")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(passes, mesh=mesh)


class _AllUnsharded:
    """All of a sharded module's weights gathered, for rollouts and evaluation: no collective per
    decode step, so processes may run different numbers of forwards. Re-entrant; resharded when
    the outermost use exits."""

    def __init__(self, passes):
        from torch.distributed.fsdp import FSDPModule

        self.units = [m for m in passes.modules() if isinstance(m, FSDPModule)]
        self.depth = 0

    def __enter__(self):
        self.depth += 1
        if self.depth == 1:
            for unit in self.units:
                unit.set_reshard_after_forward(False, recurse=False)
                unit.set_reshard_after_backward(False, recurse=False)
                unit.unshard()

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            for unit in self.units:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)
                unit.set_reshard_after_backward(True, recurse=False)
