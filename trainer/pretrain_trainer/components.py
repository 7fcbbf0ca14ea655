"""TorchX components of the trainer: `pretrain`, a PretrainJob's worth of training options.

    torchx run -s pretrainjob pretrain_trainer.components:pretrain --nodes 2 --nproc_per_node 8 \\
        --preset llama3-1b --steps 1000 --checkpoint_claim ckpt
    torchx run -s pretrainjob --dryrun pretrain_trainer.components:pretrain --nodes 2   # the PretrainJob, printed

Importable without torch (TorchX imports components to build the AppDef on the submitting
machine). The options land in the role's `metadata["pretrainjob"]`, a partial PretrainJobSpec
that the `pretrainjob` scheduler (pretrain_torchx.scheduler) completes and validates;
other schedulers ignore it, so this component is meant for `-s pretrainjob`.
"""

import shlex
from typing import Dict, Optional

from torchx import specs

from pretrain_operator import api, render

DEFAULT_IMAGE = api.PretrainJobSpec.model_fields["image"].default


def pretrain(
    nodes: int = 1,
    min_nodes: int = 0,
    nproc_per_node: int = 1,
    preset: str = "tiny",
    steps: int = 100,
    seq_len: int = 128,
    global_batch_size: int = 8,
    micro_batch_size: int = 1,
    lr: float = 3e-4,
    warmup_steps: int = -1,
    data: str = "",
    tensor: int = 1,
    pipeline: int = 1,
    precision: str = "fp32",
    seed: int = 1234,
    checkpoint_interval: int = 50,
    checkpoint_path: str = "/checkpoints",
    checkpoint_claim: str = "",
    image: str = DEFAULT_IMAGE,
    name: str = "pretrain",
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    env: Optional[Dict[str, str]] = None,
    command: str = "",
) -> specs.AppDef:
    """Pretrain a Llama-style decoder as a PretrainJob: a gang of `nodes` pods of `nproc_per_node` ranks,
    restarted from its latest checkpoint after a spot preemption.

    Args:
        nodes: pods in the gang (torchrun nodes), one per machine
        min_nodes: the fewest nodes the gang may run on when capacity is short (elastic.minNodes); 0: always all
        nproc_per_node: ranks per pod, usually its GPU count
        preset: model shape: tiny, small, llama3-1b, llama3-8b or llama3-70b
        steps: optimizer steps in all
        seq_len: tokens per sample
        global_batch_size: samples per optimizer step over all data-parallel ranks
        micro_batch_size: samples per forward pass on one rank
        lr: peak learning rate (AdamW)
        warmup_steps: linear warm-up steps (-1: 10, or steps when fewer)
        data: a prepared folder inside the pod (python -m pretrain_trainer prepare); empty: a small synthetic corpus
        tensor: tensor-parallel degree (data parallelism takes the rest of nodes x nproc_per_node)
        pipeline: pipeline-parallel stages
        precision: fp32 or bf16
        seed: seed for weight init and data order
        checkpoint_interval: checkpoint every N steps
        checkpoint_path: checkpoint folder inside the pods
        checkpoint_claim: PersistentVolumeClaim mounted at checkpoint_path (else an emptyDir, lost with the pods)
        image: trainer image
        name: the job's name (a random suffix is added)
        cpu: CPUs requested per pod (0: none)
        gpu: GPUs per pod, requested and limited (0: none)
        memMB: memory per pod in MiB, requested and limited (0: none)
        env: extra environment variables, KEY=VALUE,KEY2=VALUE2
        command: replaces the trainer's command in every pod (shell words); empty: the trainer under torchrun
    """
    world = nodes * nproc_per_node
    partial = {
        "nprocPerNode": nproc_per_node,
        "parallelism": {"data": max(world // (tensor * pipeline), 1), "tensor": tensor, "pipeline": pipeline},
        "model": {"preset": preset},
        "data": {"path": data, "seqLen": seq_len, "globalBatchSize": global_batch_size,
                 "microBatchSize": micro_batch_size},
        "optimizer": {"lr": lr, "minLr": float(f"{lr / 10:.6g}"),
                      "warmupSteps": min(10, steps) if warmup_steps < 0 else warmup_steps},
        "training": {"steps": steps, "seed": seed, "precision": precision},
        "checkpoint": {"path": checkpoint_path, "intervalSteps": checkpoint_interval},
    }
    argv = shlex.split(command) if command else render.default_command()
    return specs.AppDef(name=name, roles=[specs.Role(
        name="trainer",
        image=image,
        entrypoint=argv[0],
        args=argv[1:],
        env=dict(env or {}),
        num_replicas=nodes,
        min_replicas=min_nodes or None,
        resource=specs.Resource(cpu=cpu, gpu=gpu, memMB=memMB),
        mounts=[specs.VolumeMount(src=checkpoint_claim, dst_path=checkpoint_path)] if checkpoint_claim else [],
        metadata={"pretrainjob": partial},
    )])
