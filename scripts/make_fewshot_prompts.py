"""A prompt file whose prompts begin alike: an instruction and eight worked examples, then each one's own input
(few-shot sentiment classification), for timing --share_prefixes against --noshare_prefixes.

    python scripts/make_fewshot_prompts.py --out fewshot.jsonl [--prompts 64] [--seed 0]
    llama-cli --ckpt_dir checkpoints/smollm2-135m --prompts_file fewshot.jsonl --max_gen_len 3 --temperature 0 \\
        --max_batch_size 8 --output jsonl [--noshare_prefixes]
"""

import argparse
import json
import random

EXAMPLES = [("The food was cold and the waiter ignored us for an hour.", "negative"),
            ("Absolutely loved the atmosphere, we will come back soon!", "positive"),
            ("It was fine, nothing special, a bit pricey for what you get.", "neutral"),
            ("The staff went out of their way to make my birthday special.", "positive"),
            ("I found a hair in my soup and the manager just shrugged.", "negative"),
            ("Decent coffee, friendly barista, but the chairs are uncomfortable.", "neutral"),
            ("Best pizza in town, crispy crust and fresh basil on top.", "positive"),
            ("Overbooked, noisy, and the dessert tasted like cardboard.", "negative")]
WORDS = "great awful slow tasty rude lovely cheap bland cozy dirty amazing service pasta wine table view".split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    head = "Classify the sentiment of each restaurant review as positive, negative or neutral.\n\n" + "".join(
        f"Review: {review}\nSentiment: {label}\n\n" for review, label in EXAMPLES)
    with open(a.out, "w") as f:
        for _ in range(a.prompts):
            review = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
            f.write(json.dumps({"prompt": head + f"Review: {review}\nSentiment:"}) + "\n")


if __name__ == "__main__":
    main()
