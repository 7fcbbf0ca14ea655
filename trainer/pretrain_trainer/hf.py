"""Hugging Face import and export: Llama (dense) and Mixtral (softmax top-k MoE) folders, PEFT adapters.

    python -m pretrain_trainer export --config job.yaml --checkpoint DIR --out DIR [--merge-lora] [--max-shard-gb N]
    model: {initFrom: HF_DIR}         lora: {baseCheckpoint: HF_DIR}        # import, in a job spec
    python -m pretrain_trainer eval --config job.yaml --checkpoint HF_DIR   # the held-out loss of a folder

`export` writes `config.json`, `model.safetensors` (or `model-0000N-of-0000M.safetensors` shards
with `model.safetensors.index.json`), `generation_config.json` and, when the data folder has one,
the tokenizer (`tokenizer.json` with a `tokenizer_config.json`); `transformers` loads it with
`LlamaForCausalLM` / `MixtralForCausalLM` and no custom code. A LoRA checkpoint exports the base
model in OUT and the adapters in PEFT's format in OUT/adapter (`adapter_config.json`,
`adapter_model.safetensors`), which `peft.PeftModel.from_pretrained` loads onto that base; with
`--merge-lora` OUT is one model with W + (alpha / rank) B A. Weights are written in fp32.

The trainer's rotary embedding rotates interleaved pairs (Meta's layout), Hugging Face's rotates
halves: q and k projections (and a LoRA B on them) have their rows permuted on export and back
on import, exactly as transformers' own Llama conversion does, so an import of an export gives
the same tensors bit for bit.

Refused, with a message naming the field: MoE with sigmoid routing, bias balancing, a shared
expert, token dropping, top-1 routing (Mixtral renormalises the chosen weights, the Switch
router does not) or dense layers between MoE layers; Mixtral has none of these.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from .data import EOT_TOKENS
from .model import ModelArgs

LAYER_MAP = {  # ours (inside layers.N.) -> Hugging Face (inside model.layers.N.)
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.router": "block_sparse_moe.gate",
}
TOP_MAP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


class Unsupported(ValueError):
    """A configuration no Hugging Face architecture expresses."""


def check_exportable(args: ModelArgs) -> str:
    """The architecture name, or Unsupported naming the field."""
    m = args.moe
    if m is None:
        return "LlamaForCausalLM"
    problems = []
    if m.routerScore != "softmax":
        problems.append("model.moe.routerScore must be softmax")
    if m.loadBalancing == "bias":
        problems.append("model.moe.loadBalancing bias (the selection bias) has no Mixtral equivalent")
    if m.sharedExpert:
        problems.append("model.moe.sharedExpert has no Mixtral equivalent")
    if m.capacityFactor > 0:
        problems.append("model.moe.capacityFactor > 0 (token dropping) has no Mixtral equivalent")
    if m.topK < 2:
        problems.append("model.moe.topK 1 (Switch routing keeps the router probability; Mixtral renormalises it to 1)")
    if m.everyKLayers != 1:
        problems.append("model.moe.everyKLayers must be 1 (Mixtral has MoE in every layer)")
    if problems:
        raise Unsupported("no Hugging Face architecture expresses this model: " + "; ".join(problems))
    return "MixtralForCausalLM"


def hf_config(args: ModelArgs) -> dict:
    arch = check_exportable(args)
    cfg = {
        "architectures": [arch], "model_type": "llama" if arch == "LlamaForCausalLM" else "mixtral",
        "hidden_size": args.dim, "intermediate_size": args.ffnDim, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kvHeads, "head_dim": args.dim // args.heads,
        "vocab_size": args.vocabSize, "max_position_embeddings": args.maxSeqLen, "rms_norm_eps": args.normEps,
        "rope_theta": args.ropeTheta, "rope_parameters": {"rope_type": "default", "rope_theta": args.ropeTheta},
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "torch_dtype": "float32", "dtype": "float32", "use_cache": True,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
    }
    if arch == "LlamaForCausalLM":
        cfg["mlp_bias"] = False
    else:
        cfg.update(num_local_experts=args.moe.experts, num_experts_per_tok=args.moe.topK,
                   router_aux_loss_coef=args.moe.auxLossCoef, output_router_logits=False, router_jitter_noise=0.0,
                   sliding_window=None)
    return cfg


def args_match(args: ModelArgs, cfg: dict) -> list[str]:
    """Differences between the job's model and a Hugging Face config.json, as 'field: ours vs theirs'."""
    want = {"dim": cfg.get("hidden_size"), "layers": cfg.get("num_hidden_layers"), "heads": cfg.get("num_attention_heads"),
            "kvHeads": cfg.get("num_key_value_heads", cfg.get("num_attention_heads")), "vocabSize": cfg.get("vocab_size"),
            "ffnDim": cfg.get("intermediate_size")}
    out = [f"model.{k}: {getattr(args, k)} vs {v}" for k, v in want.items() if getattr(args, k) != v]
    # What the shapes do not show, and would make another model of the same weights: the rotary
    # base (Llama 3's 500000 against 10000), the norm's epsilon, a rotary scaling or biases, which
    # this model does not have.
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    if float(theta) != args.ropeTheta:
        out.append(f"model.ropeTheta: {args.ropeTheta:g} vs {float(theta):g}")
    if float(cfg.get("rms_norm_eps", args.normEps)) != args.normEps:
        out.append(f"rms_norm_eps: {args.normEps:g} (this trainer's) vs {float(cfg['rms_norm_eps']):g}")
    scaling = cfg.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        out.append(f"rope scaling {scaling.get('rope_type', scaling.get('type'))!r}: this trainer has none")
    for bias in ("attention_bias", "mlp_bias"):
        if cfg.get(bias):
            out.append(f"{bias}: this trainer's model has no biases")
    experts = cfg.get("num_local_experts")
    if (args.moe.experts if args.moe else None) != experts:
        out.append(f"model.moe.experts: {args.moe.experts if args.moe else 'none'} vs {experts or 'none'}")
    elif experts and args.moe.topK != cfg.get("num_experts_per_tok"):
        out.append(f"model.moe.topK: {args.moe.topK} vs {cfg.get('num_experts_per_tok')}")
    return out


# ---- rotary layout: Meta's interleaved pairs <-> Hugging Face's halves ---------------------------
def _to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _rope_heads(name: str, args: ModelArgs) -> int | None:
    if ".attention.wq." in name or ".self_attn.q_proj." in name:
        return args.heads
    if ".attention.wk." in name or ".self_attn.k_proj." in name:
        return args.kvHeads
    return None


def _hf_name(ours: str) -> str:
    m = re.match(r"layers\.(\d+)\.(.+?)\.(weight|lora_A\.weight|lora_B\.weight)$", ours)
    if m:
        layer, mod, tail = m.groups()
        e = re.match(r"feed_forward\.experts\.(\d+)\.(w[123])$", mod)
        hf_mod = f"block_sparse_moe.experts.{e.group(1)}.{e.group(2)}" if e else LAYER_MAP[mod]
        return f"model.layers.{layer}.{hf_mod}.{tail}"
    top, tail = ours.rsplit(".", 1)
    return f"{TOP_MAP[top]}.{tail}"


def to_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Our (unwrapped, full) state dict -> Hugging Face names and rotary layout."""
    out = {}
    for k, v in sd.items():
        heads = _rope_heads(k, args)
        if heads and not k.endswith("lora_A.weight"):
            v = _to_halves(v, heads)
        out[_hf_name(k)] = v.detach().to(torch.float32).contiguous()
    return out


def from_hf(hf_sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    inverse = {v: k for k, v in LAYER_MAP.items()}
    top_inverse = {v: k for k, v in TOP_MAP.items()}
    out = {}
    for k, v in hf_sd.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some exporters write: this model computes its own
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", k)
        if m:
            layer, mod = m.groups()
            e = re.match(r"block_sparse_moe\.experts\.(\d+)\.(w[123])$", mod)
            if not e and mod not in inverse:
                raise ValueError(f"tensor {k} has no place in this model (a module it does not have)")
            ours = f"layers.{layer}.feed_forward.experts.{e.group(1)}.{e.group(2)}.weight" if e else \
                f"layers.{layer}.{inverse[mod]}.weight"
        else:
            top, tail = k.rsplit(".", 1)
            if top not in top_inverse or tail != "weight":  # a bias, say: loading without it is another model
                raise ValueError(f"tensor {k} has no place in this model")
            ours = f"{top_inverse[top]}.{tail}"
        heads = _rope_heads(ours, args)
        try:
            out[ours] = _to_pairs(v, heads) if heads else v
        except RuntimeError as e:  # a shape the heads do not divide: another model's tensor
            raise ValueError(f"tensor {k} has shape {tuple(v.shape)}, which this model's attention heads do not fit: {e}") from e
    return out


# ---- files -------------------------------------------------------------------------------------
def write_safetensors(sd: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file
    shards: list[dict] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's weights: model.safetensors, else the shards its index names (transformers'
    order). A file that cannot be read (cut short by a download) is a ValueError naming it: exit
    85 under the trainer, not a traceback retried to the failure budget's end."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    files = ["model.safetensors"] if single.exists() or not index.exists() else \
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out = {}
    for f in files:
        try:
            out.update(load_file(str(folder / f)))
        except SafetensorError as e:
            raise ValueError(f"{folder / f} cannot be read as safetensors ({e}): an incomplete copy?") from e
    return out


def clear_weights(out: Path) -> None:
    """Remove an earlier export's weight files from `out`: its shards and index beside a new
    single file (or the other way round) made readers disagree on which weights the folder holds."""
    for f in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        f.unlink(missing_ok=True)
    shutil.rmtree(out / "adapter", ignore_errors=True)


def load_hf(model, folder: Path) -> None:
    """A Hugging Face Llama/Mixtral folder into an unsharded model (or a pipeline stage of one)."""
    cfg = json.loads((folder / "config.json").read_text())
    args = model.args
    diff = args_match(args, cfg)
    if diff:
        raise ValueError(f"{folder}/config.json does not match the job's model ({'; '.join(diff)})")
    sd = from_hf(read_safetensors(folder), args)
    # The selection bias of aux-loss-free balancing (a buffer, zero at the start) has no Mixtral
    # tensor: a Mixtral folder seeds such a model with its bias at zero (it was refused as lacking it).
    own = {k: t for k, t in model.state_dict().items() if not k.endswith(".expert_bias")}
    missing = [k for k in own if k not in sd]
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} weights the model needs, e.g. {missing[:3]}")
    wrong = [f"{_hf_name(k)} is {tuple(sd[k].shape)}, the model's {k} {tuple(t.shape)}" for k, t in own.items() if sd[k].shape != t.shape]
    if wrong:
        raise ValueError(f"{folder} holds weights of other shapes than the job's model: {'; '.join(wrong[:3])}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(sd[k].to(t.dtype))


def _tokenizer(data_path: str, out: Path, cfg: dict) -> bool:
    """The data's tokenizer.json (from `prepare`), its end-of-text token as eos."""
    src = Path(data_path) / "tokenizer.json" if data_path else None
    if not src or not src.exists():
        return False
    shutil.copy(src, out / "tokenizer.json")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg["max_position_embeddings"]}
    doc = json.loads(src.read_text())
    ids = {**(doc.get("model", {}).get("vocab") or {}), **{t["content"]: t["id"] for t in doc.get("added_tokens") or []}}
    try:  # the separator `prepare` wrote between documents (a given tokenizer's may be named otherwise)
        eot_id = json.loads((src.parent / "manifest.json").read_text())["eot"]
        eot = next((t for t, i in ids.items() if i == eot_id), None)
    except (OSError, ValueError, KeyError, TypeError):
        eot = next((t for t in EOT_TOKENS if t in ids), None)
    if eot is not None:
        tok_cfg["eos_token"] = eot
        cfg["eos_token_id"] = ids[eot]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
    return True


def export(config: str, checkpoint: str | None, out: str, merge_lora: bool = False, max_shard_gb: float = 5.0) -> Path:
    """The checkpoint as a Hugging Face folder (and a PEFT adapter folder for LoRA)."""
    from .evaluate import model_from_checkpoint
    from .lora import lora_layers
    from .train import ConfigError, load_spec
    spec = load_spec(config)
    args = ModelArgs.from_spec(spec.model)
    try:
        cfg = hf_config(args)
    except Unsupported as e:
        raise ConfigError(str(e))
    model, d = model_from_checkpoint(spec, checkpoint)
    wrapped = lora_layers(model)
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    adapters = {}
    for name, m in wrapped.items():
        del sd[f"{name}.base.weight"]
        sd[f"{name}.weight"] = m.merged_weight() if merge_lora else m.base.weight.detach()
        adapters[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        adapters[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    dst = Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    clear_weights(dst)
    _tokenizer(next((path for _, path, _ in spec.data.folders()), ""), dst, cfg)  # a blend shares one tokenizer
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    (dst / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": cfg["eos_token_id"]}, indent=1))
    write_safetensors(to_hf(sd, args), dst, int(max_shard_gb * 2**30))
    if wrapped and not merge_lora:
        write_peft_adapter(to_hf(adapters, args), spec.lora, sorted(wrapped), dst / "adapter", str(dst.resolve()))
    print(f"exported {d} as {cfg['architectures'][0]} to {dst}" + (" (+ PEFT adapter in adapter/)" if wrapped and not merge_lora
                                                                      else " (LoRA merged)" if wrapped else ""))
    return dst


def write_peft_adapter(hf_adapters: dict[str, torch.Tensor], lora_spec, wrapped: list[str], out: Path, base: str) -> None:
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    modules = sorted({_hf_name(f"{n}.weight").rsplit(".", 1)[0] for n in wrapped})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": lora_spec.rank,
        "lora_alpha": lora_spec.alpha, "lora_dropout": lora_spec.dropout, "target_modules": modules, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None}, indent=1))
    save_file({f"base_model.model.{k}": v for k, v in hf_adapters.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
