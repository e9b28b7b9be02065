"""Sentence embeddings through the Transformers backend (transformers >= 5.0 for BERT-family encoders).

    python examples/embed.py [MODEL]        # default: the bundled all-MiniLM-L6-v2
"""
import os
import sys
from pathlib import Path

from vllm import LLM

default = Path(os.environ.get("VTB_CACHE", Path.home() / ".cache/vllm-transformers-backend")) / "models/all-MiniLM-L6-v2"
model = sys.argv[1] if len(sys.argv) > 1 else str(default)
sentences = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
             "A monkey is playing drums."]

llm = LLM(model=model, runner="pooling", device="cpu", dtype="float32")
vectors = [o.outputs.embedding for o in llm.embed(sentences, use_tqdm=False)]
print(f"{len(vectors)} vectors of {len(vectors[0])} floats")
for i, sentence in enumerate(sentences[1:], 1):
    similarity = sum(a * b for a, b in zip(vectors[0], vectors[i]))  # unit vectors: dot = cosine
    print(f"{similarity:.4f}  {sentences[0]!r} vs {sentence!r}")
