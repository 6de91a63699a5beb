"""Ask a question about an image.

On a Mac:  python examples/image_qa.py --model Qwen/Qwen3.5-0.8B photo.jpg "What is in it?"
Offline:   point --model at a local checkpoint directory (a multimodal one: with its vision tower).
"""

import argparse

from qwen35_mlx import generate, load

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("image", help="an image file: PNG, JPEG, WebP, GIF, BMP or TIFF")
parser.add_argument("question", nargs="?", default="Describe this image.")
parser.add_argument("--model", default="Qwen/Qwen3.5-0.8B")
parser.add_argument("--max-tokens", type=int, default=512)
args = parser.parse_args()

model, tokenizer = load(args.model)
result = generate(
    model,
    tokenizer,
    args.question,
    images=[args.image],
    max_tokens=args.max_tokens,
    temp=0.7,
    top_p=0.8,
    top_k=20,
    presence_penalty=1.5,
)
print(result.text)
print(
    f"({result.generation_tokens} tokens; the prompt with the image: {result.prompt_tokens} "
    f"tokens at {result.prompt_tps:.0f} tokens/s)"
)
