"""Upcycle a dense Llama-style HF checkpoint into a Mixtral MoE checkpoint (`UpcycleJob`, `run_upcycle`): the
model-level wrapping of `megatron_slim.compress.upcycle_ffn`, which splits one FFN on plain tensors. Used by the
`upcycle` command and by the demo, which builds its teacher with it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_slim.errors import UserError
from megatron_slim.runtime.config_loader import setting

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerBase

EMBEDDED_DENSE = "smollm2"


@dataclass(frozen=True, kw_only=True)
class UpcycleJob:
    """The `upcycle` command's flags, by the same names."""

    dense: str = setting(help=f"dense HF checkpoint dir, or '{EMBEDDED_DENSE}' for the embedded "
                              "SmolLM2-135M-Instruct")
    experts: int = setting(help="experts per layer (must divide the FFN size)")
    topk: int = setting(help="experts per token")
    out: Path = setting(help="output HF checkpoint dir")
    calib_tokens: int = setting(16384, help="calibration tokens (Wikipedia calibration paragraphs) for clustering "
                                            "and routers")
    router_scale: float = setting(1e-3, help="router logit scale: smaller is closer to the dense model at top-k = "
                                             "experts")
    seed: int = setting(0, help="seed of the neuron clustering into experts (k-means++ start)")
    overwrite: bool = setting(False, help="replace --out if it is an earlier output of megatron-slim (never another "
                                          "directory)")

    def validate(self) -> None:
        """Refuse expert counts no model can take, before any model is read (messages name the command's flags;
        whether --experts divides the FFN is the dense model's to say)."""
        if self.experts < 1:
            raise UserError(f"--experts must be >= 1, got {self.experts}")
        if not 1 <= self.topk <= self.experts:
            raise UserError(f"--topk must be between 1 and --experts ({self.experts}), got {self.topk}")
        if self.calib_tokens < 1:
            raise UserError(f"--calib-tokens must be >= 1, got {self.calib_tokens}")


def run_upcycle(job: UpcycleJob) -> None:
    """Calibrate on the Wikipedia calibration paragraphs, upcycle and write `job.out` (HF checkpoint + tokenizer),
    claimed before any compute (an `out` overlapping the dense input, or an existing directory without
    `overwrite`, is refused)."""
    from megatron_slim.data.assets import smollm2_hf_dir
    from megatron_slim.runtime.outputs import claim_output

    job.validate()
    dense_dir = smollm2_hf_dir() if job.dense == EMBEDDED_DENSE else Path(job.dense)
    if not (dense_dir / "config.json").is_file():
        raise FileNotFoundError(f"{dense_dir} is not an HF checkpoint dir (no config.json)")
    check_no_remote_code(dense_dir)  # before claiming anything
    with claim_output(job.out, inputs=[dense_dir], overwrite=job.overwrite, kind="hf") as staging:
        _upcycle_into(job, dense_dir, staging)


def _upcycle_into(job: UpcycleJob, dense_dir: Path, staging: Path) -> None:
    """Calibrate, upcycle and save into `staging` (claimed by run_upcycle)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_slim.data.wiki import wiki_splits
    from megatron_slim.runtime.host_memory import retain_freed_memory

    retain_freed_memory()  # the calibration and the per-layer split allocate the same large tensors layer by layer
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(dense_dir, local_files_only=True, trust_remote_code=False)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype="auto", local_files_only=True,
                                                 trust_remote_code=False).eval()
    stored_dtype = dense.dtype
    sequences = calibration_sequences(tokenizer, wiki_splits().calibration, job.calib_tokens)
    print(f"capturing FFN inputs on {job.calib_tokens} calibration tokens")
    # calibrate and split in float32; write in the dtype the dense checkpoint was stored in
    moe = upcycle_model(dense.to(torch.float32), sequences, job.experts, job.topk, router_scale=job.router_scale,
                        seed=job.seed, progress=True)
    moe.to(stored_dtype).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    print(f"wrote {job.out} ({job.experts} experts, top-{job.topk}) in {time.perf_counter() - start:.0f}s")


def check_no_remote_code(dense_dir: Path) -> None:
    """A dense model transformers does not know (its config's `auto_map` points at code in the checkpoint) is
    refused: transformers would otherwise ask interactively whether to run that code, and we never do."""
    from transformers import CONFIG_MAPPING

    from megatron_slim.models.config import read_json_object

    path = dense_dir / "config.json"
    config = read_json_object(path)
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        code = " (its auto_map names code stored in the checkpoint, which megatron-slim never runs)" \
            if config.get("auto_map") else ""
        raise UserError(f"{path}: model_type {model_type!r} is not a model transformers knows{code}; upcycle needs "
                        "a dense decoder transformers implements (e.g. llama)")


def calibration_sequences(tokenizer: PreTrainedTokenizerBase, texts: list[str],
                          max_tokens: int) -> list[torch.Tensor]:
    """Token ids of whole paragraphs (the last one truncated) until `max_tokens`; one sequence per paragraph so
    no token attends across documents."""
    sequences = []
    total = 0
    for text in texts:
        if total >= max_tokens:
            break
        ids = tokenizer(text, return_tensors="pt").input_ids[0, : max_tokens - total]
        sequences.append(ids)
        total += ids.numel()
    if total < max_tokens:
        raise UserError(f"calibration texts hold only {total} tokens, fewer than the {max_tokens} requested")
    return sequences


CAPTURE_BATCH_TOKENS = 2048  # calibration tokens per batched forward (padding included)


def capture_ffn_inputs(model: LlamaForCausalLM, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs to every layer's FFN (after the post-attention norm), [tokens, hidden] per layer, the sequences'
    tokens in order. Runs the decoder without its LM head (a fifth of SmolLM2's forward would go to logits nobody
    reads), on batches of sequences of similar length, right-padded: attention is causal, so padding after a
    token changes nothing of it, and only real tokens are kept. One sequence per forward made every matmul ~80
    rows high: the demo's calibration forward (98 paragraphs, 8,192 tokens) took 2.9x as long that way."""
    import torch

    layers = model.model.layers
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # longest first: little padding
    captured: list[dict[int, torch.Tensor]] = [{} for _ in layers]
    batch: list[int] = []

    def hook(i: int, inputs: tuple) -> None:
        for row, seq in enumerate(batch):
            captured[i][seq] = inputs[0][row, :len(sequences[seq])].float()

    hooks = [layer.mlp.register_forward_pre_hook(lambda _module, inputs, i=i: hook(i, inputs))
             for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            start = 0
            while start < len(order):
                width = len(sequences[order[start]])
                batch[:] = order[start:start + max(1, CAPTURE_BATCH_TOKENS // width)]
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                for row, seq in enumerate(batch):
                    ids[row, :len(sequences[seq])] = sequences[seq]
                model.model(ids)
                start += len(batch)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat([per_seq[seq] for seq in range(len(sequences))]) for per_seq in captured]


def mixtral_config(dense_config: LlamaConfig, num_experts: int, top_k: int) -> MixtralConfig:
    """Mixtral config with the dense model's attention, norms and vocabulary and F / E neurons per expert."""
    from transformers import MixtralConfig

    if dense_config.model_type != "llama":
        raise UserError(f"only Llama-architecture dense models are supported, got {dense_config.model_type!r}")
    if dense_config.attention_bias or dense_config.mlp_bias or dense_config.hidden_act != "silu":
        raise UserError("Mixtral has no attention/MLP biases and uses SiLU; this dense model differs")
    if not 1 <= top_k <= num_experts:
        raise UserError(f"--topk must be between 1 and --experts ({num_experts}), got {top_k}")
    if num_experts < 1 or dense_config.intermediate_size % num_experts:
        raise UserError(f"FFN size {dense_config.intermediate_size} does not split into {num_experts} experts")
    return MixtralConfig(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        intermediate_size=dense_config.intermediate_size // num_experts,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        head_dim=dense_config.head_dim,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        initializer_range=dense_config.initializer_range,
        rms_norm_eps=dense_config.rms_norm_eps,
        rope_parameters=dense_config.rope_parameters,
        attention_dropout=dense_config.attention_dropout,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=dense_config.pad_token_id,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
    )


def upcycle_model(dense: LlamaForCausalLM, sequences: list[torch.Tensor], num_experts: int, top_k: int,
                  router_scale: float = 1e-3, seed: int = 0, progress: bool = False) -> MixtralForCausalLM:
    """Mixtral model whose every FFN is `dense`'s FFN upcycled on the calibration `sequences`."""
    import torch
    from tqdm import tqdm
    from transformers import MixtralForCausalLM
    from transformers.initialization import no_init_weights

    from megatron_slim.compress.upcycle_ffn import upcycle_ffn

    config = mixtral_config(dense.config, num_experts, top_k)
    hidden = capture_ffn_inputs(dense, sequences)
    state = {name: tensor for name, tensor in dense.state_dict().items() if ".mlp." not in name}
    for i, layer in enumerate(tqdm(dense.model.layers, desc="upcycling layers", disable=not progress)):
        mlp = layer.mlp
        moe = upcycle_ffn(mlp.gate_proj.weight.float(), mlp.up_proj.weight.float(), mlp.down_proj.weight.float(),
                          hidden[i], num_experts, top_k, router_scale=router_scale, seed=seed)
        hidden[i] = None  # free each layer's calibration inputs once used
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "gate.weight"] = moe.router
        state[prefix + "experts.gate_up_proj"] = torch.cat([moe.gate, moe.up], dim=1)
        state[prefix + "experts.down_proj"] = moe.down
    with no_init_weights():  # every weight is loaded next (strictly): random init would be thrown away
        model = MixtralForCausalLM(config).to(dense.dtype)
    model.load_state_dict(state, strict=True)
    model.tie_weights()  # no_init_weights skips the tying of post_init: untied, a tied model saves a second head
    model.generation_config = dense.generation_config
    return model.eval()
