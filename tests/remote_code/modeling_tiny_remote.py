"""A custom (``trust_remote_code``) decoder written for the backend's tests.

Its own module names (``ScaleNorm``, ``Mixer``, ``blocks``), its own rotary, attention through
``ALL_ATTENTION_FUNCTIONS`` unless the config says to bypass it (the negative test), with a softmax scale
that is not its ``scaling`` attribute (the backend must use the one passed per call).
"""
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_tiny_remote import TinyRemoteConfig


class ScaleNorm(nn.Module):  # an RMS norm under another name
    def __init__(self, dim, eps):
        super().__init__()
        self.scale = eps
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def eager_attention(module, q, k, v, mask, scaling, **kwargs):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * scaling
    t = q.shape[-2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2), None


class Mixer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5  # what transformers' own models pass; this one passes another
        self.softmax_scale = config.attention_scale if config.attention_scale is not None else self.scaling
        self.is_causal = True
        kv = config.num_key_value_heads * self.head_dim
        self.wq = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.wk = nn.Linear(config.hidden_size, kv, bias=False)
        self.wv = nn.Linear(config.hidden_size, kv, bias=False)
        self.wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, **kwargs):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.config.bypass_attention_interface or self.config._attn_implementation == "eager":
            fn = eager_attention
        else:
            fn = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, _ = fn(self, q, k, v, None, scaling=self.softmax_scale, **kwargs)
        return self.wo(out.reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.norm1 = ScaleNorm(config.hidden_size, config.norm_eps)
        self.mixer = Mixer(config, layer_idx)
        self.norm2 = ScaleNorm(config.hidden_size, config.norm_eps)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x, cos, sin, **kwargs):
        x = x + self.mixer(self.norm1(x), cos, sin, **kwargs)
        return x + self.down(nn.functional.silu(self.up(self.norm2(x))))


class TinyRemotePreTrainedModel(PreTrainedModel):
    config_class = TinyRemoteConfig
    base_model_prefix = "backbone"
    _supports_attention_backend = True
    _supports_sdpa = True

    def _init_weights(self, module):
        # transformers 5 builds on the meta device and re-initialises buffers through this hook too.
        if isinstance(module, TinyRemoteModel):
            module.inv_freq.copy_(module.compute_inv_freq(self.config).to(module.inv_freq.device))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.1)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()


class TinyRemoteModel(TinyRemotePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.tok = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = ScaleNorm(config.hidden_size, config.norm_eps)
        self.register_buffer("inv_freq", self.compute_inv_freq(config), persistent=False)
        self.post_init()

    @staticmethod
    def compute_inv_freq(config):
        head_dim = config.hidden_size // config.num_attention_heads
        return 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))

    def get_input_embeddings(self):
        return self.tok

    def set_input_embeddings(self, value):
        self.tok = value

    def forward(self, input_ids=None, position_ids=None, inputs_embeds=None, **kwargs):
        kwargs.pop("use_cache", None)
        kwargs.pop("return_dict", None)
        kwargs.pop("attention_mask", None)
        kwargs.pop("past_key_values", None)
        kwargs.pop("cache_position", None)
        x = self.tok(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device)[None]
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, **kwargs)
        return BaseModelOutput(last_hidden_state=self.final_norm(x))


class TinyRemoteForCausalLM(TinyRemotePreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.backbone = TinyRemoteModel(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.tok

    def get_output_embeddings(self):
        return self.head

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, **kwargs):
        hidden = self.backbone(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        return CausalLMOutput(logits=self.head(hidden))
