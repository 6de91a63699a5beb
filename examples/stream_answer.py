"""Stream an answer to a question, thinking shown apart from the answer.

On a Mac:  python examples/stream_answer.py --model Qwen/Qwen3.5-0.8B "Why is the sky blue?"
           python examples/stream_answer.py --image chart.png "What does this chart show?"
Offline:   point --model at a local checkpoint directory.
"""

import argparse

from qwen35_mlx import load, stream_generate

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("question")
parser.add_argument("--model", default="Qwen/Qwen3.5-0.8B")
parser.add_argument("--max-tokens", type=int, default=512)
parser.add_argument("--image", action="append", help="an image to ask about (repeatable)")
args = parser.parse_args()

model, tokenizer = load(args.model)
messages = [{"role": "user", "content": args.question}]
thinking = False
for response in stream_generate(
    model,
    tokenizer,
    messages,
    images=args.image,
    max_tokens=args.max_tokens,
    temp=0.7,
    top_p=0.8,
    top_k=20,
    presence_penalty=1.5,
):
    if response.reasoning and not thinking:
        print("[thinking] ", end="")
    elif thinking and not response.reasoning:
        print("\n[answer] ", end="")
    thinking = response.reasoning
    print(response.text, end="", flush=True)
print(
    f"\n({response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s, "
    f"finish: {response.finish_reason})"
)
