"""`iadgpt chat`: a multi-turn conversation with the model about one query image.

    iadgpt chat --model DIR --normal good1.png good2.png --query part.png --heatmap part_map.png
    printf 'What is wrong?\\nWhere is it?\\n' | iadgpt chat --model DIR --normal good1.png --query part.png

On start the query is inspected once (`Inspector.inspect`: the image score and the pixel map), so
the anomaly score is shown before any question, and `--heatmap` gets the map as an overlay. Then
every line read is a question: the first user turn holds the references and the query image
(the inspection prompt's layout), later turns are text only. The conversation's key/value cache is
kept between turns, so a question costs its own tokens and its answer's, not the history's
(`iadgpt.dialogue.KeptConversation`).

Output depends on who is on the other end:
  * stdin and stdout are a terminal: a "you> " prompt, and the answer streamed token by token;
  * otherwise (piped, scripted): no prompt, no streaming, and exactly one output line per
    question (line breaks and control characters of the answer become spaces), so a script can
    pair questions and answers line by line. Blank lines are skipped.
`/exit` (or `/quit`) or end of input ends the conversation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from .data.samples import DataError, load_image
from .dialogue import Dialogue, KeptConversation
from .model.checkpoint import DEVICE_HELP

EXIT_COMMANDS = frozenset({"/exit", "/quit"})


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="IADGPT or Qwen2.5-VL checkpoint (folder or hub name)")
    parser.add_argument("--normal", nargs="*", default=[], metavar="IMAGE",
                        help="normal reference images of the same product (none: zero-shot)")
    parser.add_argument("--abnormal", nargs="*", default=[], metavar="IMAGE",
                        help="optional defective examples of the same product (shown after the normals)")
    parser.add_argument("--query", required=True, metavar="IMAGE", help="the image to talk about")
    parser.add_argument("--heatmap", metavar="PNG", help="write the anomaly map over the query image here")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="score from which the query is called defective in the opening line")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit")
    parser.add_argument("--device", help=DEVICE_HELP)
    return parser


def plain_line(text: str) -> str:
    """The answer as one printable line: what scripted use reads, one line per question."""
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()


class ChatSession:
    """The conversation state: the loaded model, the query with its references, and the turns."""

    def __init__(self, inspector, dialogue: Dialogue, max_new_tokens: int = 512):
        self.inspector = inspector
        self.dialogue = dialogue
        self.max_new_tokens = max_new_tokens
        self.conversation = KeptConversation(inspector.model, inspector.processor, dialogue)

    def ask(self, question: str, stream_to: TextIO | None = None) -> str:
        """The model's answer to `question` given the history; streamed to `stream_to` if given."""
        streamer = None
        if stream_to is not None:
            from transformers import TextStreamer

            class _Streamer(TextStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False):
                    stream_to.write(text + ("\n" if stream_end else ""))
                    stream_to.flush()

            # only answer tokens reach it (continue_greedy), so none is skipped as the prompt
            streamer = _Streamer(self.inspector.processor.tokenizer, skip_prompt=False, skip_special_tokens=True)
        return self.conversation.ask(question, max_new_tokens=self.max_new_tokens, streamer=streamer)


def _load_images(paths: list[str]):
    return [load_image(path) for path in paths]


def run(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from .inspection import Inspector, heatmap_overlay
    from .model.checkpoint import DeviceError, device_and_dtype

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    try:
        device, _ = device_and_dtype(args.device)
    except DeviceError as err:
        raise SystemExit(f"iadgpt chat: --device: {err}") from None
    try:
        query = load_image(args.query)
        normals = _load_images(args.normal)
        abnormal = _load_images(args.abnormal)
    except DataError as err:
        raise SystemExit(f"iadgpt chat: {err}") from None
    try:
        inspector = Inspector.from_pretrained(args.model, device=device)
    except (OSError, ValueError) as err:
        raise SystemExit(f"iadgpt chat: cannot load the model {args.model}: {err}") from None

    [result] = inspector.inspect([query], [normals], [abnormal])
    verdict = "defective" if result.score >= args.threshold else "normal"
    print(f"anomaly score: {result.score:.4f} ({verdict} at threshold {args.threshold:g}; "
          f"{len(normals)} normal reference(s))", file=stdout, flush=True)
    if args.heatmap:
        Path(args.heatmap).parent.mkdir(parents=True, exist_ok=True)
        heatmap_overlay(query, result.anomaly_map).save(args.heatmap)
        print(f"heatmap written to {args.heatmap}", file=sys.stderr, flush=True)

    session = ChatSession(inspector, Dialogue(query, normals, abnormal), max_new_tokens=args.max_new_tokens)
    interactive = stdin.isatty() and stdout.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("Ask about the query image; /exit or Ctrl-D ends.", file=stdout, flush=True)
    while True:
        try:
            line = input("you> ") if interactive else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            print(file=stdout)
            break
        if not interactive and not line:  # end of input
            break
        question = line.strip()
        if not question:
            continue
        if question.lower() in EXIT_COMMANDS:
            break
        if not interactive:
            print(plain_line(session.ask(question)), file=stdout, flush=True)
            continue
        stdout.write("iadgpt> ")
        stdout.flush()
        try:
            session.ask(question, stream_to=stdout)
        except KeyboardInterrupt:  # stops this answer (not recorded in the history), keeps the conversation
            print(" [interrupted]", file=stdout, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="iadgpt chat", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
