"""The CLIP text encoders of SD 1.x, 2.x and SDXL (transformers' CLIPTextModel and
CLIPTextModelWithProjection: layouts and config.json fields).

Token + position embeddings, pre-norm transformer layers with causal multi-head self-attention and
an MLP (quick_gelu or gelu per `hidden_act`), a final layer norm; the pooled output is the final
state at the end-of-text token, and CLIPTextModelWithProjection (SDXL's second encoder) projects it
(`text_projection`, no bias) to its `text_embeds`. Module paths (tap names) are the reference's:
CLIPTextModel's start at the text model (`embeddings`, `encoder.layers.0.self_attn.q_proj`,
`final_layer_norm`; the weights of SD folders carry an extra `text_model.` prefix, which is the root
scope's weight prefix, detected from the file); CLIPTextModelWithProjection keeps them under
`text_model.` next to `text_projection`. What a pipeline conditions on (which hidden layer, final norm
or not, pooled output) is the model family's TextEmbedder (impl.families), applied by `embed`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ModelInputError
from .families import SD1
from .scope import Activation, Component, LayerNorm, Linear, Scope


class ClipAttention:
    def __init__(self, s: Scope, hidden: int, heads: int):
        if hidden % heads:
            raise ModelInputError(f"text_encoder config.json: hidden_size {hidden} is not divisible by "
                                  f"num_attention_heads {heads}")
        self.s, self.ops = s, s.ops
        self.heads = heads
        self.head_dim = hidden // heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = Linear(s.pp("q_proj"), hidden, hidden)
        self.k_proj = Linear(s.pp("k_proj"), hidden, hidden)
        self.v_proj = Linear(s.pp("v_proj"), hidden, hidden)
        self.out_proj = Linear(s.pp("out_proj"), hidden, hidden)

    def __call__(self, x):
        ops = self.ops
        b, t = x.shape[0], x.shape[1]
        q = ops.transpose(ops.reshape(self.q_proj(x), (b, t, -1, self.head_dim)), 1, 2)
        k = ops.transpose(ops.reshape(self.k_proj(x), (b, t, -1, self.head_dim)), 1, 2)
        v = ops.transpose(ops.reshape(self.v_proj(x), (b, t, -1, self.head_dim)), 1, 2)
        o = ops.attention(q, k, v, scale=self.scale, causal=True)
        o = ops.contiguous(ops.transpose(o, 1, 2))
        o = ops.reshape(o, (b, t, -1))
        o = self.out_proj(o)
        self.s.tap((o, None))  # the reference returns (attn_output, attn_weights=None)
        return o


class ClipMlp:
    def __init__(self, s: Scope, hidden: int, intermediate: int, act: str):
        self.s = s
        self.fc1 = Linear(s.pp("fc1"), hidden, intermediate)
        self.activation_fn = Activation(s.pp("activation_fn"), act)
        self.fc2 = Linear(s.pp("fc2"), intermediate, hidden)

    def __call__(self, x):
        return self.s.tap(self.fc2(self.activation_fn(self.fc1(x))))


class ClipEncoderLayer:
    """x + self_attn(layer_norm1(x)), then + mlp(layer_norm2(.))."""

    def __init__(self, s: Scope, hidden: int, intermediate: int, heads: int, eps: float, act: str):
        self.s, self.ops = s, s.ops
        self.layer_norm1 = LayerNorm(s.pp("layer_norm1"), hidden, eps)
        self.self_attn = ClipAttention(s.pp("self_attn"), hidden, heads)
        self.layer_norm2 = LayerNorm(s.pp("layer_norm2"), hidden, eps)
        self.mlp = ClipMlp(s.pp("mlp"), hidden, intermediate, act)

    def __call__(self, hidden_states):
        ops = self.ops
        self.s.tap_inputs({"hidden_states": hidden_states})
        residual = hidden_states
        h = self.self_attn(self.layer_norm1(hidden_states))
        h = ops.add(residual, h)
        residual = h
        h = self.mlp(self.layer_norm2(h))
        h = ops.add(residual, h)
        return self.s.tap(h)


class ClipTextTransformer:
    """The body of transformers' CLIPTextModel at scope `s`: embeddings, encoder layers, final layer norm,
    pooled output. Returns (and taps at `s`) {"last_hidden_state", "pooler_output"[, "hidden_states"]}."""

    def __init__(self, s: Scope, config: dict[str, Any]):
        get = config.get
        self.s, self.ops = s, s.ops
        self.hidden = int(get("hidden_size", 768))
        self.intermediate = int(get("intermediate_size", 3072))
        self.num_layers = int(get("num_hidden_layers", 12))
        self.heads = int(get("num_attention_heads", 12))
        self.max_positions = int(get("max_position_embeddings", 77))
        self.vocab_size = int(get("vocab_size", 49408))
        self.eps = float(get("layer_norm_eps", 1e-5))
        self.eos_token_id = int(get("eos_token_id", 2))
        act = get("hidden_act", "quick_gelu")
        if act not in ("quick_gelu", "gelu"):
            raise ModelInputError(f"text encoder config.json: hidden_act {act!r} is not supported (quick_gelu, gelu)")
        emb = s.pp("embeddings")
        self.token_embedding = emb.pp("token_embedding")
        self.token_weight = self.token_embedding.weight("weight", (self.vocab_size, self.hidden))
        self.position_embedding = emb.pp("position_embedding")
        self.position_weight = self.position_embedding.weight("weight", (self.max_positions, self.hidden))
        self.embeddings = emb
        if emb.has("position_ids"):
            emb.ignore("position_ids")  # a buffer older checkpoints stored
        layers = s.pp("encoder").pp("layers")
        self.layers = [ClipEncoderLayer(layers.pp(i), self.hidden, self.intermediate, self.heads, self.eps, act)
                       for i in range(self.num_layers)]
        self.encoder = s.pp("encoder")
        self.final_layer_norm = LayerNorm(s.pp("final_layer_norm"), self.hidden, self.eps)

    def __call__(self, input_ids, output_hidden_states: bool = False) -> dict:
        ops = self.ops
        shape = input_ids.shape
        ids = ops.reshape(input_ids, (-1, shape[-1]))
        seq = ids.shape[-1]
        if seq > self.max_positions:
            raise ModelInputError(f"text encoder: {seq} tokens; at most {self.max_positions} fit")
        ids_host = np.asarray(ops.to_numpy(ids))
        if ids_host.size and (ids_host.min() < 0 or ids_host.max() >= self.vocab_size):
            raise ModelInputError(f"text encoder: token ids must be in [0, {self.vocab_size}); got "
                                  f"[{ids_host.min()}, {ids_host.max()}]")
        tokens = self.token_embedding.tap(ops.embedding(ids, self.token_weight))
        positions = self.position_embedding.tap(ops.embedding(ops.asarray(np.arange(seq)[None]), self.position_weight))
        h = self.embeddings.tap(ops.add(tokens, positions))
        all_hidden = [h]
        for layer in self.layers:
            h = layer(h)
            all_hidden.append(h)
        self.encoder.tap({"last_hidden_state": h})
        last = self.final_layer_norm(h)
        if self.eos_token_id == 2:
            # legacy configs: the end-of-text token has the highest id in the vocabulary
            eos = ids_host.astype(np.int32).argmax(-1)
        else:
            eos = (ids_host == self.eos_token_id).astype(np.int32).argmax(-1)
        pooled = ops.take_tokens(last, eos)
        out = {"last_hidden_state": last, "pooler_output": pooled}
        if output_hidden_states:
            out["hidden_states"] = tuple(all_hidden)
        return self.s.tap(out)


class ClipTextModel(Component):
    """`text_encoder(input_ids, taps=None, output_hidden_states=None)` -> the reference's output dict:
    CLIPTextModel's {"last_hidden_state", "pooler_output"[, "hidden_states"]}, or with `projection`
    CLIPTextModelWithProjection's {"text_embeds", "last_hidden_state"[, "hidden_states"]};
    `embed(input_ids, embedder)` -> (context, pooled text embedding or None) as a family conditions on it;
    `encode(input_ids, clip_skip=0)` -> SD 1.x/2.x's context. `name` is the run-file component name.
    `output_hidden_states` is what a call (and a run of the root block) does when not told: whether the
    family's pipeline asks the encoder for its hidden states (SDXL's always does)."""

    def __init__(self, config: dict[str, Any], store, ops, weight_prefix: str | None = None,
                 projection: bool = False, name: str = "text_encoder", output_hidden_states: bool = False):
        self.ops = ops
        self.name = name
        self.projection = projection
        self.output_hidden_states = output_hidden_states
        if weight_prefix is None:
            # CLIPTextModel's module paths start at the text model while SD folders store its weights
            # under `text_model.`; CLIPTextModelWithProjection's paths include `text_model.` themselves
            weight_prefix = "text_model." if not projection and any(k.startswith("text_model.") for k in store.keys()) \
                else ""
        self.scope = root = Scope.root(store, ops, weight_prefix)
        self.text_model = ClipTextTransformer(root.pp("text_model") if projection else root, config)
        self.num_layers = self.text_model.num_layers
        self.final_layer_norm = self.text_model.final_layer_norm
        self.text_projection = None
        if projection:
            hidden = self.text_model.hidden
            self.text_projection = Linear(root.pp("text_projection"), hidden,
                                          int(config.get("projection_dim", hidden)), bias=False)
        store.finish(f"Is this a CLIP text encoder ({'CLIPTextModelWithProjection' if projection else 'CLIPTextModel'})"
                     " whose config.json matches its weights?")
        self._blocks = {"": self._root_block, **{layer.s.path: layer for layer in self.text_model.layers}}

    # --- forward -------------------------------------------------------------------------------
    def __call__(self, input_ids, taps=None, output_hidden_states: bool | None = None) -> dict:
        ids = self.ops.asarray(input_ids if self.ops.is_array(input_ids) else np.asarray(input_ids, dtype=np.int64))
        with self.scope.bind(taps), self.ops.inference():
            return self._root_block(ids, output_hidden_states=output_hidden_states)

    def embed(self, input_ids, embedder, clip_skip: int = 0, taps=None):
        """(context, pooled) for a family's TextEmbedder: hidden_states[embedder.hidden_layer - clip_skip],
        final-normed if the embedder says so, and the pooled text embedding if it gives one (else None)."""
        layer = embedder.hidden_layer - clip_skip
        if not -self.num_layers <= layer <= -1:
            raise ModelInputError(f"clip_skip {clip_skip} leaves no layer of this {self.num_layers}-layer text "
                                  f"encoder (hidden layer {embedder.hidden_layer} - {clip_skip})")
        last = layer == -1 and embedder.final_norm
        out = self(input_ids, taps, output_hidden_states=not last)
        pooled = out.get("text_embeds", out.get("pooler_output")) if embedder.pooled else None
        if last:
            return out["last_hidden_state"], pooled
        hidden = out["hidden_states"][layer]
        if embedder.final_norm:
            with self.ops.inference():
                lnf = self.final_layer_norm
                hidden = self.ops.layer_norm(hidden, lnf.w, lnf.b, lnf.eps)
        return hidden, pooled

    def encode(self, input_ids, clip_skip: int = 0, taps=None):
        """SD 1.x/2.x's conditioning: the final-normed last layer, or with `clip_skip` = k > 0 the final
        layer norm applied to the output of layer num_layers - k (diffusers' clip_skip)."""
        return self.embed(input_ids, SD1.conditioning.embedders[0], clip_skip, taps)[0]

    def _root_block(self, input_ids, output_hidden_states: bool | None = None):
        if output_hidden_states is None:
            output_hidden_states = self.output_hidden_states
        self.scope.tap_inputs({"input_ids": input_ids})
        out = self.text_model(input_ids, output_hidden_states)
        if self.text_projection is not None:
            projected = {"text_embeds": self.text_projection(out["pooler_output"]),
                         "last_hidden_state": out["last_hidden_state"]}
            if output_hidden_states:
                projected["hidden_states"] = out["hidden_states"]
            return self.scope.tap(projected)
        return out


__all__ = ["ClipAttention", "ClipEncoderLayer", "ClipMlp", "ClipTextModel", "ClipTextTransformer"]
