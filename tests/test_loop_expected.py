"""Expected judge score vs a float64 full-logits reference on a tiny random Llama."""
import torch

from loop.expected_score import expected_scores
from model.config import preset
from model.llama import Llama


def test_expected_scores_match_reference():
    torch.manual_seed(0)
    model = Llama(preset("tiny", vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                         max_seq_len=64))
    model.init_weights(0.5, torch.Generator().manual_seed(0))
    model.eval()
    seqs = [[1, 5, 9, 3], [1, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
    score_ids = [10, 11, 12, 13, 14, 15]
    got = expected_scores(model, seqs, score_ids, max_batch_tokens=12)  # forces several batches
    m64 = model.double()
    for s, g in zip(seqs, got):
        with torch.no_grad():
            logp = m64(torch.tensor([s]))[0, -1].log_softmax(-1)
        p = logp[score_ids].exp()
        assert abs(g["mass"] - float(p.sum())) < 1e-5
        assert abs(g["expected"] - float((p / p.sum() * torch.arange(6)).sum())) < 1e-5
        assert 0.0 <= g["expected"] <= 5.0
