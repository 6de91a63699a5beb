"""Ask a question about a short video: a video file (needs PyAV: the `video` extra), an animated
GIF, or a directory of frame images.

On a Mac:  python examples/video_qa.py --model Qwen/Qwen3.5-0.8B clip.mp4 "What happens?"
Offline:   point --model at a local checkpoint directory (a multimodal one: with its vision tower).
Frames are sampled at --fps (the checkpoint's default is 2 per second); each pair of frames
becomes one group of tokens, labelled with its time in the prompt.
"""

import argparse

from qwen35_mlx import generate, load

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("video")
parser.add_argument("question", nargs="?", default="Describe what happens in this video.")
parser.add_argument("--model", default="Qwen/Qwen3.5-0.8B")
parser.add_argument("--fps", type=float, default=None, help="frames sampled per second")
parser.add_argument("--max-tokens", type=int, default=512)
args = parser.parse_args()

model, tokenizer = load(args.model, processor_options={"fps": args.fps} if args.fps else None)
result = generate(
    model,
    tokenizer,
    args.question,
    videos=[args.video],
    max_tokens=args.max_tokens,
    temp=0.7,
    top_p=0.8,
    top_k=20,
    presence_penalty=1.5,
)
print(result.text)
print(
    f"({result.generation_tokens} tokens; the prompt with the video: {result.prompt_tokens} "
    f"tokens at {result.prompt_tps:.0f} tokens/s)"
)
