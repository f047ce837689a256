import pytest
import torch

from svq_fast.config import GPTConfig
from svq_fast.models.gpt import KVCache, SemanticGPT, StaticKVCache


def tiny_gpt(**kw):
    cfg = GPTConfig(
        image_vocab=40,
        semantic_vocab=12,
        grid=4,
        n_layer=2,
        n_head=2,
        n_embd=32,
        cfg_dropout=0.0,
        attn_backend="sdpa",
        **kw,
    )
    return SemanticGPT(cfg).double().eval()


def tokens(b=3):
    return torch.randint(0, 12, (b, 16)), torch.randint(0, 40, (b, 16))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("prefix_lm", [False, True])
def test_changing_a_future_image_token_leaves_past_logits(prefix_lm, aligned):
    m = tiny_gpt(prefix_lm=prefix_lm, aligned_condition=aligned)
    sem, img = tokens()
    logits, _ = m(sem, img)
    img2 = img.clone()
    img2[:, 9] = (img2[:, 9] + 1) % 40
    logits2, _ = m(sem, img2)
    # logits[:, i] predicts token i from tokens < i: positions <= 9 cannot see token 9
    torch.testing.assert_close(logits[:, :10], logits2[:, :10])
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])


def test_prefix_block_is_bidirectional_only_with_prefix_lm():
    sem, img = tokens()
    sem2 = sem.clone()
    sem2[:, -1] = (sem2[:, -1] + 1) % 12
    for prefix_lm, expect_change in [(False, False), (True, True)]:
        m = tiny_gpt(prefix_lm=prefix_lm)
        # hidden state of semantic token 0 via the cache prefill: compare a probe of layer outputs
        c1, c2 = KVCache(2), KVCache(2)
        m.prefill(sem, c1)
        m.prefill(sem2, c2)
        # keys of the first semantic position in layer 1 depend on layer-0 attention over the prefix
        changed = not torch.allclose(c1.k[1][:, :, 0], c2.k[1][:, :, 0])
        assert changed == expect_change


def test_loss_counts_image_tokens_only():
    m = tiny_gpt()
    sem, img = tokens()
    logits, loss = m(sem, img)
    assert logits.shape == (3, 16, 40)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), img.reshape(-1))
    torch.testing.assert_close(loss, ref)


def test_cfg_dropout_rate():
    m = tiny_gpt()
    m.cfg.cfg_dropout = 0.3
    m.train()
    sem, img = tokens(b=4000)
    seen = []
    orig = m._embed_condition

    def spy(s, uncond):
        seen.append(uncond)
        return orig(s, uncond)

    m._embed_condition = spy
    with torch.no_grad():
        m(sem[:, :16], img[:, :16])
    rate = seen[0].float().mean().item()
    assert abs(rate - 0.3) < 0.03


def test_kv_cache_logits_equal_full_recomputation():
    m = tiny_gpt(prefix_lm=True)
    sem, img = tokens(b=2)
    cache = KVCache(2)
    step_logits = [m.prefill(sem, cache)]
    for i in range(5):
        step_logits.append(m.decode_step(img[:, i], cache))
    for i, lg in enumerate(step_logits):
        torch.testing.assert_close(lg, m.logits_full(sem, img[:, :i]))


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("prefix_lm", [False, True])
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_both_caches_equal_full_recomputation(kind, prefix_lm, aligned):
    m = tiny_gpt(prefix_lm=prefix_lm, aligned_condition=aligned)
    sem, img = tokens(b=2)
    cache = KVCache(2) if kind == "dynamic" else StaticKVCache(2, m.max_len)
    a = m.aligned_condition(sem, None)
    step_logits = [m.prefill(sem, cache)]
    for i in range(6):
        step_logits.append(m.decode_step(img[:, i], cache, None if a is None else a[:, i + 1]))
    assert cache.length == 16 + 6
    for i, lg in enumerate(step_logits):
        torch.testing.assert_close(lg, m.logits_full(sem, img[:, :i]))
        torch.testing.assert_close(lg, m(sem, img)[0][:, i])  # the training forward agrees too


def test_aligned_condition_reaches_the_prediction_of_its_own_cell():
    """With position-aligned conditioning, semantic token i informs the logits of image token i directly: without
    it, a plain prefix model's logits still depend on token i, but only through attention; the aligned embedding
    table must be the path (zeroing it removes the extra dependence)."""
    torch.manual_seed(0)
    m = tiny_gpt(aligned_condition=True)
    sem, img = tokens(b=2)
    sem2 = sem.clone()
    sem2[:, 7] = (sem2[:, 7] + 1) % 12
    base = m(sem, img)[0]
    moved = m(sem2, img)[0]
    m.aligned_emb.weight.data.zero_()
    no_aligned = m(sem, img)[0] - m(sem2, img)[0]
    # the aligned input at position P+6 (predicting token 7) differs: its logits move more than via attention alone
    assert (base[:, 7] - moved[:, 7]).abs().max() > 10 * no_aligned[:, 7].abs().max()
    # null-condition rows see no aligned embedding at all
    uncond = torch.ones(2, dtype=torch.bool)
    assert m.aligned_condition(sem, uncond).abs().max() == 0
    assert tiny_gpt().aligned_condition(sem, None) is None


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("prefix_lm", [False, True])
def test_fixed_shape_decode_step_equals_recomputation(prefix_lm, aligned):
    """decode_step_at is what the CUDA graph captures; its math is checked here on CPU."""
    m = tiny_gpt(prefix_lm=prefix_lm, aligned_condition=aligned)
    sem, img = tokens(b=2)
    uncond = torch.tensor([False, True])
    a = m.aligned_condition(sem, uncond)
    cache = StaticKVCache(2, m.max_len)
    m.prefill(sem, cache, uncond)
    pos = torch.zeros(1, dtype=torch.long)
    for i in range(5):
        pos.fill_(cache.length)
        lg = m.decode_step_at(img[:, i], pos, cache, None if a is None else a[:, i + 1])
        cache.advance(1)
        torch.testing.assert_close(lg, m.logits_full(sem, img[:, : i + 1], uncond))


def test_static_cache_buffers_are_written_in_place_and_checked():
    m = tiny_gpt()
    sem, img = tokens(b=2)
    cache = StaticKVCache(2, m.max_len)
    m.prefill(sem, cache)
    buf = cache.k[0]
    assert buf.shape == (2, 2, 32, 16)  # (B, H, T_max, d), allocated once
    m.decode_step(img[:, 0], cache)
    assert cache.k[0] is buf and cache.length == 17
    with pytest.raises(ValueError, match="new cache"):
        m.decode_step(img[:1, 0], cache)  # another batch size
    small = StaticKVCache(2, 16)
    m.prefill(sem, small)
    with pytest.raises(ValueError, match="overflows max_len=16"):
        m.decode_step(img[:, 0], small)


@pytest.mark.parametrize("prefix_lm", [False, True])
def test_chunked_ce_matches_plain_loss_and_gradients(prefix_lm):
    cfg = dict(image_vocab=40, semantic_vocab=12, grid=4, n_layer=2, n_head=2, n_embd=32, cfg_dropout=0.0,
               attn_backend="sdpa", prefix_lm=prefix_lm)  # fmt: skip
    plain = SemanticGPT(GPTConfig(**cfg))
    chunked = SemanticGPT(GPTConfig(**cfg), chunked_ce=True, ce_chunk_rows=7)  # 48 rows -> 7 chunks, last short
    chunked.load_state_dict(plain.state_dict())
    sem, img = tokens(b=3)
    uncond = torch.tensor([False, True, False])
    logits, loss = plain(sem, img, uncond=uncond)
    none, loss_c = chunked(sem, img, uncond=uncond)
    assert logits is not None and none is None
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
    loss.backward()
    loss_c.backward()
    for (name, p), pc in zip(plain.named_parameters(), chunked.parameters()):
        assert pc.grad is not None, name
        torch.testing.assert_close(pc.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # no gradient work, same value
        torch.testing.assert_close(chunked(sem, img, uncond=uncond)[1], loss.detach(), rtol=1e-6, atol=1e-6)


def test_chunked_ce_under_autocast_and_state_dict_keys():
    cfg = GPTConfig(image_vocab=40, semantic_vocab=12, grid=4, n_layer=1, n_head=2, n_embd=32, cfg_dropout=0.0,
                    attn_backend="sdpa")  # fmt: skip
    plain, chunked = SemanticGPT(cfg), SemanticGPT(cfg, chunked_ce=True)
    assert "head.weight" in chunked.state_dict() and "head.bias" not in chunked.state_dict()
    chunked.load_state_dict(plain.state_dict())
    sem, img = tokens(b=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = plain(sem, img)
        _, loss_c = chunked(sem, img)
    assert loss_c.dtype == torch.float32
    torch.testing.assert_close(loss_c, loss.float(), rtol=2e-2, atol=2e-2)


def test_image_nll_is_the_per_sample_training_loss():
    m = tiny_gpt(aligned_condition=True)
    sem, img = tokens(b=3)
    nll = m.image_nll(sem, img)
    assert nll.shape == (3,)
    torch.testing.assert_close(nll.mean(), m(sem, img)[1])
    null = m.image_nll(sem, img, uncond=torch.ones(3, dtype=torch.bool))
    assert (nll - null).abs().max() > 0  # at init the logits are small: any difference shows the condition is used
