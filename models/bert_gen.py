"""Export a BERT-style sentence encoder from PyTorch/transformers, with seeded random weights.

Nothing can be downloaded on the build machines, so the weights come from a config, not a hub:
the graph is what a user's `torch.onnx.export` of a MiniLM-class sentence encoder gives
(transformers' BertModel, three int64 inputs ``input_ids``, ``attention_mask`` and
``token_type_ids``, the legacy TorchScript exporter at opset 17), followed by the mean
pooling over the mask that sentence-transformers applies. Output: ``sentence_embedding``.

Needs ``torch`` and ``transformers`` (see requirements.txt).
"""

from __future__ import annotations

from pathlib import Path

# name -> (layers, hidden, heads, intermediate, vocab, sequence length)
CONFIGS = {
    "minilm": (6, 384, 12, 1536, 30522, 128),  # all-MiniLM-L6-v2's shape
    "tiny": (2, 32, 2, 64, 100, 16),  # for tests: seconds to build
    # google/bert_uncased_L-4_H-256_A-4's shape: shapes the committed logs have never seen
    "bert_mini": (4, 256, 4, 1024, 30522, 128),
}


def export(out_path: Path, seed: int, config: str = "minilm") -> None:
    """Write the encoder of shape ``CONFIGS[config]`` with weights from ``seed``."""
    import torch
    from transformers import BertConfig, BertModel

    layers, hidden, heads, intermediate, vocab, seq = CONFIGS[config]
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=intermediate,
        max_position_embeddings=max(512, seq), type_vocab_size=2,
        attn_implementation="eager"), add_pooling_layer=False).eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden_states = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                      token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
            return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq), generator=gen)
    mask = torch.ones(1, seq, dtype=torch.int64)
    types = torch.zeros(1, seq, dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(SentenceEncoder().eval(), (ids, mask, types), str(out_path),
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["sentence_embedding"], opset_version=17,
                          dynamo=False)


def generate(out_path: Path, seed: int) -> None:
    """The pipeline's generator entry point: the MiniLM-shaped encoder."""
    export(out_path, seed, "minilm")


if __name__ == "__main__":
    import sys

    export(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0,
           sys.argv[3] if len(sys.argv) > 3 else "minilm")
