"""Compare two images, written as an OpenAI-style message with a content list.

On a Mac:  python examples/compare_images.py --model Qwen/Qwen3.5-0.8B before.png after.png
Offline:   point --model at a local checkpoint directory (a multimodal one: with its vision tower).
"""

import argparse

from qwen35_mlx import generate, load

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("first")
parser.add_argument("second")
parser.add_argument("--question", default="What are the differences between these two images?")
parser.add_argument("--model", default="Qwen/Qwen3.5-0.8B")
parser.add_argument("--max-tokens", type=int, default=512)
args = parser.parse_args()

model, tokenizer = load(args.model)
messages = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Image 1:"},
            {"type": "image", "image": args.first},
            {"type": "text", "text": "Image 2:"},
            {"type": "image", "image": args.second},
            {"type": "text", "text": args.question},
        ],
    }
]
result = generate(
    model,
    tokenizer,
    messages,
    max_tokens=args.max_tokens,
    temp=0.7,
    top_p=0.8,
    top_k=20,
    presence_penalty=1.5,
)
print(result.text)
print(f"({result.generation_tokens} tokens, finish: {result.finish_reason})")
