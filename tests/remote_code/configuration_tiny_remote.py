"""A custom (``trust_remote_code``) config for the backend's tests."""
from transformers import PretrainedConfig


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tiny_remote"

    def __init__(self, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, rope_theta=10000.0,
                 norm_eps=1e-6, bypass_attention_interface=False, tie_word_embeddings=False, attention_scale=0.09,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.bypass_attention_interface = bypass_attention_interface
        # the softmax scale the attention passes per call; its `scaling` attribute keeps head_dim ** -0.5
        self.attention_scale = attention_scale
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
