"""sparsify on attention: nn.MultiheadAttention becomes SparseMultiheadAttention (q, k, v, out_proj as their
own layers, each with its spec), keeping the dense module's call signature and results."""

import copy

import pytest
import torch
from torch import nn

import sparsec
from sparsec.nn.attention import SparseMultiheadAttention


def _dense_equivalent(module):
    """The module sparsified at 0% (every weight kept): it must compute what the dense one computes."""
    return sparsec.sparsify(copy.deepcopy(module), spec="0%")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_an_encoder_layer_computes_what_the_dense_one_computes(train):
    torch.manual_seed(0)
    dense = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    sparse = _dense_equivalent(dense)
    assert isinstance(sparse.self_attn, SparseMultiheadAttention)
    assert all(isinstance(getattr(sparse.self_attn, p), sparsec.SparseLinear) for p in ("q", "k", "v", "out_proj"))
    x = torch.randn(3, 7, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    padding = torch.zeros(3, 7)
    padding[1, 5:] = -torch.inf  # float masks, as the causal one
    dense.train(train), sparse.train(train)
    expected = dense(x, src_mask=causal, src_key_padding_mask=padding, is_causal=True)
    torch.testing.assert_close(sparse(x, src_mask=causal, src_key_padding_mask=padding, is_causal=True), expected)


def test_attention_weights_and_sequence_first_inputs_match_the_dense_module():
    torch.manual_seed(1)
    dense = nn.MultiheadAttention(16, 2)  # sequence-first
    sparse = SparseMultiheadAttention.from_dense(dense, lambda _, linear: linear)
    q, kv = torch.randn(5, 3, 16), torch.randn(6, 3, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[2, 4:] = True
    for average in (True, False):
        want = dense(q, kv, kv, key_padding_mask=padding, average_attn_weights=average)
        got = sparse(q, kv, kv, key_padding_mask=padding, average_attn_weights=average)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    want, _ = dense(q[:, 0], kv[:, 0], kv[:, 0], need_weights=False)  # unbatched
    torch.testing.assert_close(sparse(q[:, 0], kv[:, 0], kv[:, 0], need_weights=False)[0], want)


def test_a_sparse_transformer_trains_with_rigl_updates_and_per_projection_specs():
    torch.manual_seed(2)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
    sparsec.sparsify(model, spec="90%", policy=sparsec.rigl(delta_t=2), overrides={"*.self_attn.q": "2:4"})
    attention = model.layers[0].self_attn
    assert str(attention.q.spec) == "2:4" and str(attention.k.spec) == "unstructured(0.9)"
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    updater = sparsec.MaskUpdater(model, opt, total_steps=20)
    x = torch.randn(4, 6, 32)
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[0, 4:] = True
    dropped = 0
    for _ in range(4):
        model(x, src_key_padding_mask=padding).square().mean().backward()
        opt.step()
        updater.step()
        dropped += sum(updater.last_dropped.values())
        opt.zero_grad()
    assert dropped > 0
    model.eval()  # the encoder's fused path is declined: it would read the packed projection
    assert torch.isfinite(model(x, src_key_padding_mask=padding)).all()


def test_decoder_layers_and_dense_attention_on_request():
    torch.manual_seed(3)
    layer = nn.TransformerDecoderLayer(32, 4, 64, batch_first=True)
    sparsec.sparsify(layer, spec="80%", dense=["multihead_attn"])
    assert isinstance(layer.self_attn, SparseMultiheadAttention)
    assert isinstance(layer.multihead_attn, nn.MultiheadAttention)  # kept as it was
    tgt, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    layer(tgt, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5), tgt_is_causal=True).sum().backward()
    assert layer.self_attn.q.values.grad is not None


def test_attention_it_cannot_rebuild_is_refused_with_the_dense_fix():
    model = nn.Sequential(nn.Linear(8, 8))
    model.append(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(sparsec.SparsecError, match=r"1 \(nn.MultiheadAttention\).*add_bias_kv.*dense=\['1'\]"):
        sparsec.sparsify(model, spec="50%")


class TiedHead(nn.Module):
    """A language-model head tied to its embedding: it reads ``self.head.weight`` itself."""

    def __init__(self):
        super().__init__()
        self.embed, self.body, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.body(self.embed(tokens))))


def test_a_module_that_reads_a_linears_weight_is_refused_with_the_dense_fix():
    with pytest.raises(sparsec.SparsecError, match=r"TiedHead\) reads head.weight .* dense=\['head'\]"):
        sparsec.sparsify(TiedHead(), spec="50%")
    model = sparsec.sparsify(TiedHead(), spec="50%", dense=["head"])  # the fix works
    assert isinstance(model.body, sparsec.SparseLinear) and model.head.weight is model.embed.weight
    model(torch.tensor([[1, 2, 3]])).sum().backward()


def test_an_encoder_layer_with_dense_attention_keeps_its_feed_forward_dense_too():
    """With its attention kept dense, TransformerEncoderLayer's fused eval path runs and reads linear1.weight."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(sparsec.SparsecError, match=r"reads linear1.weight .* dense=\['linear1', 'linear2'\]"):
        sparsec.sparsify(layer, spec="50%", dense=["self_attn"])
