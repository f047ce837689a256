"""Training-step counters known on the host (svq_fast/nn/host_counter.py): the quantizers' step and the latent
swap's draw counter advance without a device read, and are read again after a state dict is loaded."""

import torch

from svq_fast.models.svq import SVQModel
from svq_fast.named_configs import get_config
from svq_fast.nn.quantizer import VectorQuantizer
from svq_fast.train.host_reads import HostReadCounter


def test_model_forward_reads_nothing_between_dead_code_searches_and_rereads_after_a_load():
    cfg = get_config("svqgan_tiny")
    cfg.model.ch, cfg.quantizer.restart_every = 16, 3
    model = SVQModel(cfg.model, cfg.quantizer).train()
    assert cfg.model.latent_swap > 0  # the swap's draw counter is exercised too
    x, s = torch.randn(2, 3, 64, 64), torch.randint(0, 16, (2, 64, 64))
    model(x, s)  # step 1: the codebooks' data init reads the fresh step once
    reads = []
    for _ in range(4):  # steps 2..5: the dead-code search (a read per quantizer) runs at step 3 only
        with HostReadCounter() as counter:
            model(x, s)
        reads.append(counter.count)
    assert reads == [0, 2, 0, 0] and int(model.quantizer_x.step) == 5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["quantizer_x.step"].fill_(101)
    model.load_state_dict(state)
    with HostReadCounter() as counter:
        model(x, s)
    # the three counters are read once after the load; both quantizers' steps (102 and 6) are multiples of 3: each
    # searches for dead codes (one read each)
    assert int(model.quantizer_x.step) == 102 and int(model.quantizer_s.step) == 6 and counter.count == 3 + 2


def test_restarts_happen_at_multiples_of_restart_every():
    torch.manual_seed(0)
    q = VectorQuantizer(64, 4, restart_after=2, restart_every=5, init_from_data=False).train()
    z = torch.randn(2, 4, 2, 2)  # 8 latents: most of the 64 codes die
    seen = []
    for step in range(1, 11):
        before = int(q.restarts)
        q(z)
        if int(q.restarts) > before:
            seen.append(step)
    assert seen == [5, 10]
