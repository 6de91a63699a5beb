"""qwen35-mlx: Alibaba's Qwen3.5 small models on MLX.

from qwen35_mlx import load, generate
model, tokenizer = load("Qwen/Qwen3.5-0.8B")
print(generate(model, tokenizer, [{"role": "user", "content": "Hi"}]).text)
print(generate(model, tokenizer, "What is in this picture?", images=["photo.jpg"]).text)
"""

from .generate import Completion, GenerationResponse, generate, generate_step, stream_generate
from .loading import load
from .prompt import VisionCache
from .score import Score, score

__all__ = [
    "Completion",
    "GenerationResponse",
    "Score",
    "VisionCache",
    "generate",
    "generate_step",
    "load",
    "score",
    "stream_generate",
]
