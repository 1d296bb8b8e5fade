import os

import pytest
from hypothesis import HealthCheck, settings

# Example counts are set by the environment, as tiktoken's tests do: HYPOTHESIS_MAX_EXAMPLES=2000 for a soak.
settings.register_profile(
    "default",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("default")


@pytest.fixture
def one_torch_thread():
    """For files of tiny-tensor tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    torch's thread pool only adds contention on the shared CI machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Tiny random Hugging Face models: the one home of the tests' builders (benches build their own; they do not
# import tests). Test files import them: `from conftest import hf_llama, save_hf_llama`.
# The special tokens of the three SFT templates (alpaca's end of text, chatml, llama3).
CHAT_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

TINY_HF = dict(  # tokenmill's "tiny" preset as a transformers config, with a 96-wide MLP
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def hf_llama(kind="llama", seed=0, spread=False, **config):
    """A random transformers LlamaForCausalLM (MistralForCausalLM for ``kind="mistral"``, no sliding window
    unless ``config`` gives one) of ``TINY_HF`` with ``config``'s fields over it, drawn after
    ``torch.manual_seed(seed)``. ``spread``: weights far from their init (norms U(0.5, 1.5), the rest
    N(0, 0.15)), so that a wrongly mapped tensor changes the logits by far more than a test's tolerance."""
    import torch
    import transformers

    # copies of dict values: transformers edits the dicts it is given
    fields = {**TINY_HF, **{k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}}
    torch.manual_seed(seed)
    if kind == "mistral":
        model = transformers.MistralForCausalLM(
            transformers.MistralConfig(**{"sliding_window": None, **fields})
        )
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    if spread:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.15)
    return model


def save_hf_llama(path, max_shard_size=None, **kw):
    """``hf_llama(**kw)`` saved in ``path`` with save_pretrained (in shards of ``max_shard_size`` when given);
    returns ``path``."""
    save = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    hf_llama(**kw).save_pretrained(path, **save)
    return path
