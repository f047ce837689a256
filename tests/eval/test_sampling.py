import pytest
import torch

from svq_fast.config import GPTConfig
from svq_fast.eval.sampling import filter_logits, sample_image_tokens
from svq_fast.models.gpt import SemanticGPT


def test_top_k_keeps_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).sum() == 2 and torch.isfinite(out[0, [1, 3]]).all()


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = filter_logits(probs.log(), top_p=0.7)  # 0.5 < 0.7, 0.5 + 0.3 reaches it: keep two
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    out = filter_logits(probs.log(), top_p=0.1)  # the top token always stays
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


def _gpt():
    cfg = GPTConfig(image_vocab=30, semantic_vocab=10, grid=4, n_layer=2, n_head=2, n_embd=32, attn_backend="sdpa")
    return SemanticGPT(cfg).double().eval()


def test_cache_sampling_equals_recomputation_with_cfg():
    m = _gpt()
    sem = torch.randint(0, 10, (3, 16))
    kw = dict(temperature=1.0, top_k=20, top_p=0.95, guidance_scale=1.5)
    a = sample_image_tokens(m, sem, generator=torch.Generator().manual_seed(1), use_cache=True, **kw)
    b = sample_image_tokens(m, sem, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    assert torch.equal(a, b)
    c = sample_image_tokens(m, sem, generator=torch.Generator().manual_seed(2), **kw)
    assert not torch.equal(a, c)
    assert a.shape == (3, 16) and a.max() < 30


def test_zero_temperature_is_greedy():
    m = _gpt()
    sem = torch.randint(0, 10, (2, 16))
    a = sample_image_tokens(m, sem, temperature=0.0)
    first = m.logits_full(sem, a[:, :0]).argmax(-1)
    assert torch.equal(a[:, 0], first)


def _gpt_prefix(prefix_lm: bool, aligned: bool = False):
    cfg = GPTConfig(image_vocab=30, semantic_vocab=10, grid=4, n_layer=2, n_head=2, n_embd=32, attn_backend="sdpa",
                    prefix_lm=prefix_lm, aligned_condition=aligned)  # fmt: skip
    return SemanticGPT(cfg).double().eval()


@pytest.mark.parametrize("guidance", [1.0, 1.5])
@pytest.mark.parametrize("prefix_lm,aligned", [(False, False), (True, False), (False, True)])
def test_dynamic_and_static_caches_equal_recomputation(prefix_lm, aligned, guidance):
    m = _gpt_prefix(prefix_lm, aligned)
    sem = torch.randint(0, 10, (2, 16))
    kw = dict(temperature=1.0, top_k=20, top_p=0.95, guidance_scale=guidance)
    ref = sample_image_tokens(m, sem, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    for cache in ("dynamic", "static"):
        got = sample_image_tokens(m, sem, generator=torch.Generator().manual_seed(3), cache=cache, **kw)
        assert torch.equal(got, ref), cache


def test_num_tokens_gives_the_first_tokens():
    m = _gpt()
    sem = torch.randint(0, 10, (2, 16))
    full = sample_image_tokens(m, sem, generator=torch.Generator().manual_seed(0), cache="static")
    part = sample_image_tokens(m, sem, generator=torch.Generator().manual_seed(0), cache="static", num_tokens=5)
    assert torch.equal(part, full[:, :5])
    with pytest.raises(ValueError, match="num_tokens"):
        sample_image_tokens(m, sem, num_tokens=17)
    with pytest.raises(ValueError, match="cache must be"):
        sample_image_tokens(m, sem, cache="paged")


def test_cuda_graph_is_ignored_off_cuda():
    m = _gpt()
    sem = torch.randint(0, 10, (2, 16))
    ref = sample_image_tokens(m, sem, generator=torch.Generator().manual_seed(4), cache="static", num_tokens=4)
    with pytest.warns(UserWarning, match="CUDA only"):
        got = sample_image_tokens(m, sem, generator=torch.Generator().manual_seed(4), cuda_graph=True, num_tokens=4)
    assert torch.equal(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_cuda_graph_sampling_equals_recomputation_on_cuda(guidance, aligned):
    m = _gpt_prefix(True, aligned).cuda()  # fp64: no near-ties between the masked full-buffer and the sliced attention
    sem = torch.randint(0, 10, (3, 16), device="cuda")
    kw = dict(temperature=1.0, top_k=20, top_p=0.95, guidance_scale=guidance)

    def run(**extra):
        return sample_image_tokens(m, sem, generator=torch.Generator("cuda").manual_seed(5), **kw, **extra)

    ref = run(use_cache=False)
    assert torch.equal(run(cache="static"), ref)
    assert torch.equal(run(cuda_graph=True), ref)
