"""How a trainer config lays the actor and the rollout out over the cluster, and the divisions that must hold.

verl 0.9.1's ``validate_config`` checks the world size against the model-parallel group only without dynamic
batch sizes, and Megatron's ``initialize_model_parallel`` / verl's rollout workers assert the rest once every
GPU has been allocated. The same arithmetic, from the config alone, lets ``--check`` refuse a layout that does not
divide before the cluster starts, and print the layout a run will get (DP x TP x PP x CP per node count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["ParallelLayout"]

ACTOR = "actor_rollout_ref.actor.megatron"
ROLLOUT = "actor_rollout_ref.rollout"


@dataclass(frozen=True)
class ParallelLayout:
    """The actor's Megatron group sizes, the rollout replicas' sizes and the cluster they share (hybrid engine)."""

    nnodes: int
    gpus_per_node: int
    tp: int
    pp: int
    cp: int
    ep: int = 1
    etp: Optional[int] = None  # Megatron's default: the dense tensor-parallel size
    rollout_tp: int = 1
    rollout_dp: int = 1
    rollout_pp: int = 1

    @classmethod
    def from_config(cls, config, nnodes: Optional[int] = None) -> ParallelLayout:
        """The layout of a composed trainer config (``nnodes`` replaces ``trainer.nnodes``)."""
        megatron, rollout = config.actor_rollout_ref.actor.megatron, config.actor_rollout_ref.rollout
        return cls(
            nnodes=config.trainer.nnodes if nnodes is None else nnodes,
            gpus_per_node=config.trainer.n_gpus_per_node,
            tp=megatron.tensor_model_parallel_size,
            pp=megatron.pipeline_model_parallel_size,
            cp=megatron.context_parallel_size,
            ep=megatron.expert_model_parallel_size,
            etp=megatron.expert_tensor_parallel_size,
            rollout_tp=rollout.tensor_model_parallel_size,
            rollout_dp=rollout.data_parallel_size,
            rollout_pp=rollout.pipeline_model_parallel_size,
        )

    @property
    def world_size(self) -> int:
        return self.nnodes * self.gpus_per_node

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense part (Megatron's, context parallelism excluded)."""
        return self.world_size // self.model_parallel_size

    @property
    def expert_group_size(self) -> int:
        return (self.etp or self.tp) * self.ep * self.pp

    @property
    def rollout_replica_size(self) -> int:
        return self.rollout_tp * self.rollout_dp * self.rollout_pp

    @property
    def rollout_replicas(self) -> int:
        return self.world_size // self.rollout_replica_size

    def problems(self) -> list[str]:
        """Each division the layout breaks, naming the keys and a fix; empty when it is sound."""
        world = f"{self.world_size} GPUs (trainer.nnodes={self.nnodes} x trainer.n_gpus_per_node={self.gpus_per_node})"
        found = []
        if self.world_size % self.model_parallel_size:
            found.append(
                f"{world} is not a multiple of the actor's model-parallel group tensor x pipeline x context = "
                f"{self.tp} x {self.pp} x {self.cp} = {self.model_parallel_size} ({ACTOR}.tensor_model_parallel_size, "
                "pipeline_model_parallel_size, context_parallel_size): change the node count or these sizes"
            )
        if self.ep > 1 and self.world_size % self.expert_group_size:
            found.append(
                f"{world} is not a multiple of the expert group expert-tensor x expert x pipeline = "
                f"{self.etp or self.tp} x {self.ep} x {self.pp} = {self.expert_group_size} "
                f"({ACTOR}.expert_tensor_parallel_size, expert_model_parallel_size): lower expert_model_parallel_size "
                "or add nodes"
            )
        if self.world_size % self.rollout_replica_size:
            found.append(
                f"{world} is not a multiple of one rollout replica tensor x data x pipeline = {self.rollout_tp} x "
                f"{self.rollout_dp} x {self.rollout_pp} = {self.rollout_replica_size} ({ROLLOUT}."
                "tensor_model_parallel_size, data_parallel_size, pipeline_model_parallel_size)"
            )
        return found

    def describe(self) -> str:
        """One line per component, e.g. ``actor: DP 16 x TP 2 x PP 2 x CP 2``."""
        lines = [
            f"cluster: {self.nnodes} node(s) x {self.gpus_per_node} GPUs = {self.world_size} GPUs",
            f"actor:   DP {self.dp} x TP {self.tp} x PP {self.pp} x CP {self.cp}",
        ]
        if self.ep > 1:
            lines.append(
                f"experts: EP {self.ep} x ETP {self.etp or self.tp} (expert-data-parallel "
                f"{self.world_size // self.expert_group_size})"
            )
        lines.append(
            f"rollout: {self.rollout_replicas} replica(s) x TP {self.rollout_tp}"
            + (f" x DP {self.rollout_dp}" if self.rollout_dp > 1 else "")
            + (f" x PP {self.rollout_pp}" if self.rollout_pp > 1 else "")
        )
        return "\n".join(lines)
