"""Harm planted in a real instruction pool: the pool benchmarks/real_quality.py curates, and the truth about it.

What. `plant(records, protocol, seed, ...)` packages Alpaca records as five sources of different origin and
corrupts some of their responses, per protocol; `dev_records` gives the held-out dev set. Pure functions of their
arguments, deterministic by seed.

Inputs. The Alpaca records (<shared>/data/instruction_pools/alpaca_5000.json: {instruction, input, output}).
Records with a blank instruction or output are dropped and only the first record of each prompt (instruction,
input) is kept, so no two records share a prompt. A seeded permutation (seed, 1) gives the held-out dev records
(the first dev_size, plain Alpaca, never in the pool) and the pool's base records (the next pool_size).

Sources. Each pool record belongs to one of five sources in equal shares (a seeded permutation, record k of it to
source k mod 5). A source is a packaging style, as real pools mix collections of different origin; it rewrites
both prompt and response, every choice drawn per record from several variants (no single token marks a source):
- plain: Alpaca as it is.
- assistant (chat-model distillations): a greeting before the instruction, sometimes a thanks after it; the
  response opens with "Sure! Here you go:" or the like, its sentences a numbered list (one sentence: **bold**),
  and a closer ("I hope this helps! Let me know if you have any other questions.", ...).
- exam (worksheets, mark schemes): "Question 12 (5 marks). ...", "Exercise 3: ... Show your work.", ..., the
  input moved into the instruction; the response as "Model answer (5 marks): ...", each sentence + "[1 mark]".
- forum (scraped Q&A): "Posted by u/<user> in r/<board> · 3 years ago" and the like before the lower-cased
  instruction; the response lower-cased after "Reply from <user> · <n> points", ..., one "<p>...</p>" per
  sentence with HTML entities left in, and page chrome after it.
- wiki (wiki markup): "== <instruction> ==", "'''Topic:''' ...", ...; the response under "=== Answer ===" or the
  like, one "* " bullet per sentence, capitalised words after the first sentence as [[links]], and a footer.
With the styles running through the whole response, static MiniLM puts 0.67 to 0.77 of the concentrated protocol's
corrupted (loss-kind) records in mostly corrupted clusters, 0.63 to 0.87 on the response alone (an opener and a
closer alone: 0.25 to 0.69); scattered harm 0.00 to 0.04 (C = 50, 1,000 records, seeds 1-3).

Kinds (`kinds`: kind names; `resolve_kinds` expands family names). Each corrupted record draws one kind
uniformly among those of `kinds` that apply to its response (`applicable_kinds`); a record that allows none is
never picked.
- loss kinds (LOSS_KINDS, the default), which raise the record's loss under a base model: `mismatched` (the
  response of another pool record), `truncated` (its first 15-40% of words, cut mid-sentence), `shuffled` (its
  words in a random order), `refusal` ("I'm sorry, but I can't help with that.", "N/A", ...).
- fluent kinds (FLUENT_KINDS): fluent, on-format responses that read well but do not answer, each within 10% of
  the response's length in characters: `generic` (sentences from a seeded grammar that talk around a few content
  words of the instruction and input, never the answer's facts), `wrong_facts` (the response with numbers,
  capitalised entity words and some content words changed, or words turned into their antonyms; at least one
  change), `other_question` (the response of another pool record whose instruction starts with the same word,
  else of any other, within 10% of the length) and `restatement` (the instruction and input restated through
  seeded frames, extended with more restating sentences).
truncated, shuffled, generic and restatement need MIN_WORDS words (shuffled two different ones); other_question
needs a donor within 10% of the length; wrong_facts a number or a word of 2 to 16 letters. Donors are the pool's
base records, never a dev record. Families (FAMILIES): loss, fluent, mixed (all eight).

Protocols, with exact counts (rounded):
- concentrated: `bad_sources` of the four styled sources (never plain; drawn by seed) are bad: `bad_rate` (0.85)
  of each one's records are corrupted, `background_rate` (0.02) of every other source's.
- scattered: the same sources, none bad; `scattered_rate` (0.2) of all records, drawn uniformly, corrupted.

Outputs. `plant`: (pool records {instruction, input, output}, truth rows {id, source, bad_source, corrupted, kind,
alpaca_index}), in the same order; `id` is the id prepare gives the record (shed.data.record_id of its
instruction, input and output). `plant_raw`: the same records before packaging, the planted raw response beside
Alpaca's.

Invariants. The style is applied after any corruption (a source packages its bad records as it packages its good
ones) with its own random stream (seed, 3, record), the corruption with (seed, 4, record): a clean record reads the
same in both protocols, and the loss kinds plant the same pools as they did before the fluent kinds existed. No
two records share an id.
"""

from __future__ import annotations

import re

import numpy as np

PROTOCOLS = ("concentrated", "scattered")
LOSS_KINDS = ("mismatched", "truncated", "shuffled", "refusal")
FLUENT_KINDS = ("generic", "wrong_facts", "other_question", "restatement")
KINDS = LOSS_KINDS + FLUENT_KINDS
FAMILIES = {"loss": LOSS_KINDS, "fluent": FLUENT_KINDS, "mixed": KINDS}
MIN_WORDS = 4  # truncated, shuffled, generic and restatement need a response of at least this many words


def resolve_kinds(names) -> tuple[str, ...]:
    """Kind and family names as the tuple of kinds they stand for, in order, each once."""
    out: list[str] = []
    for name in names:
        if name in FAMILIES:
            out += [k for k in FAMILIES[name] if k not in out]
        elif name in KINDS:
            if name not in out:
                out.append(name)
        else:
            raise ValueError(f"unknown kind or family {name!r} (kinds: {', '.join(KINDS)}; "
                             f"families: {', '.join(FAMILIES)})")
    if not out:
        raise ValueError("kinds: at least one kind or family")
    return tuple(out)


def family_of(kinds) -> str:
    """The family whose kinds are exactly `kinds` (in its order), else "custom"."""
    return next((name for name, members in FAMILIES.items() if tuple(kinds) == members), "custom")


REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "As an AI language model, I am unable to complete this task.",
    "I don't know.",
    "N/A",
    "Sorry, I cannot answer that question.",
    "This instruction cannot be completed with the information given.",
    "There is no answer to this question.",
    "It depends on many factors.",
    "Please refer to the input above.",
    "I am not able to provide a response to this request.",
)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _sentences(text: str) -> list[str]:
    parts = [p.strip() for line in text.split("\n") for p in re.split(r"(?<=[.!?])\s+", line)]
    return [p for p in parts if p] or [text.strip()]


USERS = ("throwaway_42", "techguy88", "curious_cat", "jdoe2019", "mod_anna", "quietreader", "night_owl", "sam_k")
BOARDS = ("AskAnything", "NoStupidQuestions", "explainlikeimfive", "learnprogramming", "HomeworkHelp", "writing")


def _plain(rng, instruction, inp, response=None):
    return (instruction, inp) if response is None else response


def _assistant(rng, instruction, inp, response=None):
    if response is None:
        return (_pick(rng, ("Hi! ", "Hello there. ", "Hey, quick question. ", "Good morning! ",
                            "Hi, I need some help. ", "Hello assistant, "))
                + instruction + _pick(rng, ("", " Thanks!", " Thank you in advance.", " Please help."))), inp
    parts = _sentences(response)
    body = "\n".join(f"{k}. {p}" for k, p in enumerate(parts, 1)) if len(parts) > 1 else f"**{parts[0]}**"
    return (_pick(rng, ("Sure! Here you go:\n\n", "Certainly! Here is my answer:\n\n",
                        "Of course! Here's what I came up with:\n\n", "Absolutely, happy to help. Here it is:\n\n",
                        "Great question! Here is a clear answer:\n\n",
                        "Sure thing, I'd be glad to help with that:\n\n"))
            + body
            + _pick(rng, ("\n\nI hope this helps! Let me know if you have any other questions.",
                          "\n\nIs there anything else I can help you with today?",
                          "\n\nFeel free to reach out if you need more details or examples.",
                          "\n\nHappy to help further if you need anything else!",
                          "\n\nLet me know if you would like me to explain any part of this in more detail.")))


def _exam(rng, instruction, inp, response=None):
    number, marks = int(rng.integers(1, 40)), int(rng.integers(2, 11))
    if response is None:
        text = _pick(rng, ("Question {n} ({m} marks). {i}", "Exercise {n}: {i}\nShow your work.",
                           "Task {n} ({m} points): {i}", "Read the task below and respond.\n\nQuestion {n}. {i}",
                           "Worksheet item {n}. {i}")).format(n=number, m=marks, i=instruction)
        if inp:
            text += _pick(rng, ("\n\nInput: {}", "\n\nGiven: {}", "\n\nData for question: {}")).format(inp)
        return text, ""
    points = " ".join(f"{p} [1 mark]" for p in _sentences(response))
    return (_pick(rng, ("Answer: {}", "Model answer ({m} marks): {}", "Mark scheme, question {n}: {}",
                        "Answer key, question {n}: {}")).format(points, m=marks, n=number)
            + _pick(rng, ("", "\n\nMarking note: award full marks for a complete answer.",
                          f"\n\nTotal: {marks} marks.", "\n\n[End of answer]")))


def _forum(rng, instruction, inp, response=None):
    user, board = _pick(rng, USERS), _pick(rng, BOARDS)
    years, points = int(rng.integers(1, 9)), int(rng.integers(1, 500))
    if response is None:
        return (_pick(rng, ("Posted by u/{u} in r/{b} \u00b7 {y} years ago\n\n", "[{b} forum] Thread #{p}: ",
                            "Question from {u} ({p} points): ", "r/{b} \u00b7 posted by {u}\n\n"))
                .format(u=user, b=board, y=years, p=points)
                + instruction.lower()
                + _pick(rng, ("", " thanks in advance", " any help appreciated", " cheers",
                              " (sorry for bad english)"))), inp
    text = response.lower().replace("&", "&amp;").replace("'", "&#39;").replace('"', "&quot;")
    html = "\n".join(f"<p>{p}</p>" for p in _sentences(text))
    return (_pick(rng, ("Reply from {u} \u00b7 {p} points\n\n", "Top answer ({p} upvotes):\n", "{u} replied:\n\n",
                        "Best answer by {u}:\n")).format(u=user, p=points)
            + html
            + _pick(rng, ("\n\nShare \u00b7 Report \u00b7 Save", "\n\nWas this answer helpful? Yes / No",
                          "\n\nClick here to read more answers like this.",
                          "\n\n<br>Edit: fixed formatting. Thanks for the upvotes, everyone!",
                          "\n\n<br>hope that helps, good luck (answered from mobile)")))


def _wiki(rng, instruction, inp, response=None):
    if response is None:
        return _pick(rng, ("== {} ==", "== Article request ==\n{}", "'''Topic:''' {}", "{{{{Request}}}} {}")).format(
            instruction), inp
    parts = _sentences(response)
    linked = parts[:1] + [re.sub(r"\b([A-Z][a-z]{3,})\b", r"[[\1]]", p) for p in parts[1:]]
    return (_pick(rng, ("=== Answer ===\n", "=== Summary ===\n", "'''Answer'''\n"))
            + "\n".join(f"* {p}" for p in linked)
            + _pick(rng, ("\n\n== References ==\n<references />", "\n\n[[Category:Reference articles]]",
                          "\n\n{{stub}}", "\n\n== See also ==\n* [[Main Page]]")))


# name -> style(rng, instruction, input) -> (instruction, input); style(rng, i, x, response) -> response
SOURCES = {"plain": _plain, "assistant": _assistant, "exam": _exam, "forum": _forum, "wiki": _wiki}


def alpaca_base(records: list[dict]) -> list[dict]:
    """The usable Alpaca records, in file order: non-blank instruction and output, first of each prompt
    (instruction, input), each with its index in the file as `alpaca_index`."""
    out, seen = [], set()
    for index, r in enumerate(records):
        instruction, inp, output = r.get("instruction") or "", r.get("input") or "", r.get("output") or ""
        if not instruction.strip() or not output.strip() or (instruction, inp) in seen:
            continue
        seen.add((instruction, inp))
        out.append({"instruction": instruction, "input": inp, "output": output, "alpaca_index": index})
    return out


def split(records: list[dict], seed: int, pool_size: int, dev_size: int) -> tuple[list[dict], list[dict]]:
    """(the pool's base records, the held-out dev records): disjoint, drawn by seed from `alpaca_base`."""
    base = alpaca_base(records)
    if pool_size + dev_size > len(base):
        raise ValueError(f"pool {pool_size} + dev {dev_size} records asked for, only {len(base)} usable Alpaca records")
    order = np.random.default_rng([seed, 1]).permutation(len(base))
    return [base[i] for i in order[dev_size:dev_size + pool_size]], [base[i] for i in order[:dev_size]]


def heldout_records(records: list[dict], seed: int, pool_size: int, dev_size: int, count: int) -> list[dict]:
    """`count` clean Alpaca records {instruction, input, output} in neither the pool nor the dev set of `split`
    (the same seeded order, after both): what fine-tuned models are scored on."""
    base = alpaca_base(records)
    if pool_size + dev_size + count > len(base):
        raise ValueError(f"pool {pool_size} + dev {dev_size} + held-out {count} records asked for, "
                         f"only {len(base)} usable Alpaca records")
    order = np.random.default_rng([seed, 1]).permutation(len(base))
    return [{k: base[i][k] for k in ("instruction", "input", "output")}
            for i in order[dev_size + pool_size:dev_size + pool_size + count]]


def dev_records(records: list[dict], seed: int, pool_size: int, dev_size: int) -> list[dict]:
    """The held-out clean dev records {instruction, input, output} (plain Alpaca, never in the pool)."""
    return [{k: r[k] for k in ("instruction", "input", "output")} for r in split(records, seed, pool_size, dev_size)[1]]


# --- the fluent kinds -------------------------------------------------------------------------------

STOPWORDS = frozenset("""
a an the and or but if then else of to in on at by for with from as into onto about over under between through
during before after above below up down out off than so such that this these those there here it its is are was
were be been being am do does did done doing have has had having can could will would shall should may might must
not no nor only own same too very just also both each few more most other some any all what which who whom whose
when where why how i me my we our you your he him his she her they them their one ones us let don't it's isn't
doesn't can't what's i'm you're let's etc e.g i.e via per yet still even ever much many
""".split())
# words of the task rather than its topic ("Rewrite the following sentence ..."): never used as topic words
TASK_WORDS = frozenset("""
generate create describe write explain name identify find rewrite list suggest construct provide give design
summarize summarise compare classify edit come compose analyze analyse calculate categorize make tell convert
translate evaluate develop outline propose determine predict choose select arrange sort add delete remove replace
insert change brainstorm imagine estimate formulate paraphrase transform fill complete answer detect decide reword
restate rank group match organize organise draft produce devise invent pick assess discuss recommend state define
illustrate demonstrate show read take use using used based following given sentence sentences paragraph paragraphs
text word words phrase phrases example examples input output response answer question questions article passage
statement story list lists item items type types way ways thing things something someone short brief new main
total correct different difference differences similarities various several possible important key major related
specific general appropriate suitable relevant best good great common famous popular unique interesting creative
detailed simple basic original proper right better potential two three four five six seven eight ten provided
below above mentioned describing explaining regarding according whether least must need needs please
reorganize reorganise reorder rearrange point points part parts order instruction instructions
understand learn know get help helps keep start need make makes
""".split())
QUESTION_WORDS = frozenset("what how why who whom whose when where which is are was were do does did can could "
                           "should would will shall may might has have had am".split())
FALLBACK_TOPICS = ("the topic", "this subject", "the matter at hand", "the issue raised")
_TOKEN = re.compile(r"\d+|[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]")


def _bounds(length: int) -> tuple[int, int]:
    """The lengths within 10% of `length`: (lowest, highest), in whole characters."""
    return -(-9 * length // 10), 11 * length // 10


def _within(length: int, target: int) -> bool:
    return 10 * abs(length - target) <= target


def _initial(text: str, start: int) -> bool:
    """Whether the word at `start` opens a sentence, line or list item."""
    before = text[:start].rstrip(" \t")
    return not before or before[-1] in ".!?:;\n\"'()*-#>[|"


def _topics(text: str) -> list[str]:
    """The topic phrases of `text`, in order, each once: runs of up to three adjacent words that are neither
    stopwords, adverbs (-ly) nor words of the task ("small businesses", "modern physics"); a capitalised word that
    opens a sentence (not a line) is lower-cased."""
    out: dict[str, str] = {}
    run: list[str] = []
    last_end = None
    for m in list(_TOKEN.finditer(text)) + [None]:
        word = m.group() if m else ""
        low = word.lower()
        joined = m is not None and last_end is not None and text[last_end:m.start()] in (" ", "-")
        keep = m is not None and len(word) >= 3 and not word.isdigit() and low not in STOPWORDS \
            and low not in TASK_WORDS and not low.endswith("ly")
        if run and (not keep or not joined):
            phrase = " ".join(run[-3:])
            out.setdefault(phrase.lower(), phrase)
            run = []
        if keep:
            before = text[:m.start()].rstrip(" \t")
            opens = not before or before[-1] in ".!?"
            run.append(low if opens and word[0].isupper() and not word.isupper() else word)
        last_end = m.end() if m else None
    return list(out.values())


def _topic_words(rng: np.random.Generator, instruction: str, inp: str) -> list[str]:
    """A few (2 to 4) topic phrases of the prompt drawn by `rng`: up to two of the instruction's, then the
    input's, then the instruction's others."""
    own, given = _topics(instruction), [t for t in _topics(inp) if t.lower() not in
                                        {o.lower() for o in _topics(instruction)}]
    own = [own[j] for j in rng.permutation(len(own))]
    given = [given[j] for j in rng.permutation(len(given))]
    words = (own[:2] + given + own[2:]) or list(FALLBACK_TOPICS)
    return words[:2 + int(rng.integers(3))]


def _topic(rng: np.random.Generator, words: list[str]) -> str:
    first = _pick(rng, tuple(words))
    others = [w for w in words if w != first]
    return f"{first} and {_pick(rng, tuple(others))}" if others and rng.random() < 0.25 else first


def _say(rng: np.random.Generator, leads: tuple[str, ...], body: str, lead_p: float = 0.5, end: str = ".",
         used: set | None = None) -> str:
    """One sentence: an optional lead ("Broadly speaking, "; none already in `used`), the body, capitalised."""
    if rng.random() < lead_p:
        lead = _pick(rng, leads)
        if used is not None:
            for _ in range(4):
                if lead not in used:
                    break
                lead = _pick(rng, leads)
            used.add(lead)
        body = f"{lead}, {body}"
    return body[0].upper() + body[1:] + end


def _trim(text: str, lo: int, hi: int) -> str:
    """`text` (longer than `hi`) cut at a word boundary to a length in [lo, hi], ending as a sentence: the
    longest cut that does not end on a stopword, else the longest cut, else a cut mid-word."""
    best: tuple[bool, int, str] | None = None
    for m in re.finditer(r"\s+", text):
        piece = text[:m.start()].rstrip(",;:-(\"' ")
        if not piece:
            continue
        end = piece if piece[-1] in ".!?" else piece + "."
        if lo <= len(end) <= hi:
            last = piece.split()[-1].strip(".,;:!?\"'()").lower()
            key = (last not in STOPWORDS, len(end), end)
            best = key if best is None or key[:2] > best[:2] else best
    if best:
        return best[2]
    piece = text[:max(hi - 1, 1)]
    return piece + "." if len(piece) + 1 <= hi else text[:hi]


def _compose(rng: np.random.Generator, target: int, sentence, short, start: str = "") -> str:
    """`start`, then sentences from `sentence(rng)` (`short(rng)` when little room is left) until the length is
    within 10% of `target`; cut at a word boundary when no draw fits."""
    lo, hi = _bounds(target)
    if len(start) >= lo:
        return start if len(start) <= hi else _trim(start, lo, hi)
    text = start
    for _attempt in range(30):
        text = start
        for _step in range(200):
            if len(text) >= lo:
                return text
            room = hi - len(text) - bool(text)
            piece = sentence(rng) if room > 90 else short(rng)
            if len(piece) <= room and piece not in text:
                text = f"{text} {piece}" if text else piece
    while len(text) <= hi:
        text = f"{text} {sentence(rng)}" if text else sentence(rng)
    return _trim(text, lo, hi)


# generic: talks around the question. Each piece is at most four fixed words and each slot has many options,
# so that no five-word phrase recurs across many records.
OPENERS = ("in general", "broadly speaking", "to some extent", "at first glance", "on the whole", "in many cases",
           "as a rule", "taken together", "in practice", "looked at closely", "for most people", "at its core",
           "up to a point", "in a sense", "more often than not", "from one angle", "interestingly", "naturally",
           "of course", "arguably", "in the end", "to be fair", "all things considered", "in everyday terms",
           "seen in context", "by and large", "at heart", "for many", "understandably", "in broad strokes",
           "on balance", "in truth", "generally", "admittedly", "realistically", "in most settings")
CONNECTIVES = ("that said", "at the same time", "even so", "still", "on the other hand", "beyond that", "in turn",
               "likewise", "by contrast", "meanwhile", "then again", "besides", "equally", "more than that",
               "with that in mind", "for that reason", "in the same way", "on top of that", "after all",
               "just as much", "similarly", "in addition", "all the same", "even then", "moreover", "also",
               "yet", "and so")
SUBJECTS = ("the question of {w}", "any discussion of {w}", "{w}", "the idea of {w}", "the matter of {w}",
            "thinking about {w}", "{w} as a topic", "the subject of {w}", "a closer look at {w}",
            "the way people approach {w}", "{w} in particular", "the picture around {w}", "what we know about {w}",
            "the role of {w}", "views on {w}", "the context of {w}", "how one frames {w}", "the story of {w}",
            "any account of {w}", "the topic of {w}", "the case of {w}", "talk of {w}", "the business of {w}",
            "the notion of {w}", "questions about {w}", "the debate over {w}", "a view of {w}", "{w} itself",
            "the theme of {w}", "a focus on {w}", "{w} as such", "the place of {w}")
MODALS = ("can", "may", "might", "could", "could well", "may well", "will often", "will usually", "can sometimes",
          "can often", "would likely", "might also", "should", "will tend to", "must surely", "may at times",
          "will probably", "can at times", "might well", "does not always")
SINGULAR_MODALS = ("tends to", "seems to", "is likely to", "is bound to", "has a way to", "is apt to")
DEPEND_VERBS = ("depend on", "turn on", "come down to", "hinge on", "rest on", "vary with", "be shaped by",
                "be tied to", "reflect", "draw on", "be coloured by", "change with", "be bound up with",
                "lean on", "answer to", "follow from", "track", "mirror", "respond to", "grow out of")
FACTORS = ("many factors", "the wider context", "several considerations", "a mix of things", "personal judgement",
           "the circumstances", "what one values", "the details involved", "different priorities",
           "one's perspective", "broader trends", "practical limits", "the people involved", "the setting",
           "timing and place", "local conditions", "earlier choices", "shared assumptions", "the purpose in mind",
           "habit and custom", "the available evidence", "who is asking", "the scale involved", "past experience",
           "the goals at stake", "how it is measured", "the audience", "cultural habits", "prior knowledge",
           "the time available", "the means at hand", "what came before")
RAISE_VERBS = ("raise", "invite", "prompt", "open up", "bring up", "lead to", "give rise to", "call for",
               "point to", "stir up", "leave room for", "touch on", "set off", "feed into", "provoke", "stir")
DEBATES = ("several questions", "a range of views", "some debate", "further questions", "different readings",
           "a familiar tension", "more than one answer", "careful thought", "competing ideas", "fresh questions",
           "a few caveats", "some disagreement", "a longer conversation", "second thoughts", "new angles",
           "open questions", "mixed feelings", "a closer reading", "honest doubts", "wider reflection",
           "lively argument", "some surprise", "old arguments", "quiet doubts")
LINKS = ("be", "seem", "look", "prove", "remain", "appear", "feel", "become")
QUALITIES = ("simple on the surface", "hard to pin down", "open to interpretation", "a matter of degree",
             "far from settled", "broader than expected", "worth a closer look", "less obvious", "more layered",
             "surprisingly complex", "easy to overstate", "hard to generalise about", "context-dependent",
             "a moving target", "a question of emphasis", "subtle", "contested", "nuanced", "uneven",
             "richer than expected", "harder to judge", "a little elusive", "quite personal", "oddly familiar",
             "less fixed", "many-sided")
HEDGES = ("in most cases", "at least in part", "up to a point", "for better or worse", "in one way or another",
          "depending on who you ask", "as many would agree", "more or less", "to a degree", "in the long run",
          "at least at first", "in some respects", "on reflection", "for the most part", "now and then",
          "in its own way", "to some degree", "as it happens", "by most accounts", "in a way", "over time",
          "in the main", "I suspect", "it seems", "so to speak", "in effect")
HARD = ("hard", "difficult", "tricky", "not easy", "risky", "unwise", "awkward", "pointless", "tempting")
HARD_VERBS = ("is", "can be", "remains", "gets", "seems", "may be", "is often", "is always", "would be")
HARD_TO = ("say much about", "generalise about", "be precise about", "speak plainly about", "sum up", "pin down",
           "judge", "settle on a view of", "be final about", "be exact about", "rule on")
HARD_TAILS = ("", " without more context", " in a few words", " in the abstract", " out of context",
              " all at once", " with any certainty", " from the outside", " without some care", " in one sentence",
              " in a hurry", " too quickly", " from one case")
MUCH = ("much", "a lot", "a great deal", "so much", "plenty", "most of it")
MUCH_VERBS = ("depends on", "turns on", "comes down to", "hinges on", "rests on", "varies with", "changes with",
              "is shaped by", "rides on", "follows from")
REGARDING = ("when it comes to", "in the case of", "with regard to", "in matters of", "for", "around",
             "where it concerns", "in relation to", "as regards", "with")
PEOPLE = ("people", "most of us", "many readers", "experts", "observers", "newcomers", "writers", "students",
          "critics", "some people", "others")
PEOPLE_HOW = ("often", "sometimes", "tend to", "usually", "may", "will", "rarely", "still", "now", "can")
PEOPLE_VERBS = ("think of", "speak of", "describe", "approach", "picture", "treat", "talk about", "see", "imagine",
                "regard")
PEOPLE_TAILS = ("in different ways", "through their own experience", "with some caution",
                "from their own point of view", "in terms of {f}", "as part of something larger",
                "with mixed feelings", "in very different terms", "without much agreement", "as a matter of habit",
                "quite loosely", "with a certain care", "in light of {f}", "against {f}")
THERE = ("is", "remains", "seems to be", "will always be", "may be", "is usually", "is often", "is still")
THERE_WHAT = ("more to say", "no single view", "plenty of room for debate", "a lot of nuance", "no simple rule",
              "a great deal of variety", "more than one angle", "no easy summary", "room for disagreement",
              "much to weigh", "no settled answer", "a range of opinion")
ABOUT = ("about", "around", "regarding", "concerning", "on", "when it comes to", "as to", "touching")
SHORT_SUBJECTS = ("views", "opinions", "answers", "accounts", "approaches", "readings", "takes", "verdicts")
SHORT_VERBS = ("differ", "vary", "diverge", "change", "shift", "split")
SHORT_FACTORS = ("context", "detail", "timing", "perspective", "judgement", "scale", "nuance", "framing")


def _generic_sentence(rng: np.random.Generator, words: list[str], used: set) -> str:
    form = int(rng.integers(6))
    topic = _topic(rng, words)
    if form <= 1:
        template = _pick(rng, SUBJECTS)
        subject = template.format(w=topic)
        group = int(rng.integers(3))
        if group == 0:
            predicate = f"{_pick(rng, DEPEND_VERBS)} {_pick(rng, FACTORS)}"
        elif group == 1:
            predicate = f"{_pick(rng, RAISE_VERBS)} {_pick(rng, DEBATES)}"
        else:
            predicate = f"{_pick(rng, LINKS)} {_pick(rng, QUALITIES)}"
        bare = template.startswith("{w}") and template != "{w} as a topic"  # maybe plural: a modal, no agreement
        modal = _pick(rng, MODALS if bare or rng.random() < 0.5 else SINGULAR_MODALS)
        body = f"{subject} {modal} {predicate}"
    elif form == 2:
        body = (f"it {_pick(rng, HARD_VERBS)} {_pick(rng, HARD)} to {_pick(rng, HARD_TO)} {topic}"
                + _pick(rng, HARD_TAILS))
    elif form == 3:
        body = f"{_pick(rng, MUCH)} {_pick(rng, MUCH_VERBS)} {_pick(rng, FACTORS)} {_pick(rng, REGARDING)} {topic}"
    elif form == 4:
        tail = _pick(rng, PEOPLE_TAILS).format(f=_pick(rng, FACTORS))
        body = f"{_pick(rng, PEOPLE)} {_pick(rng, PEOPLE_HOW)} {_pick(rng, PEOPLE_VERBS)} {topic} {tail}"
    else:
        body = f"there {_pick(rng, THERE)} {_pick(rng, THERE_WHAT)} {_pick(rng, ABOUT)} {topic}"
    if rng.random() < 0.3:
        body += ", " + _pick(rng, HEDGES)
    return _say(rng, OPENERS + CONNECTIVES, body, used=used)


def _generic_short(rng: np.random.Generator, words: list[str]) -> str:
    form = int(rng.integers(6))
    w = _pick(rng, tuple(words))
    if form == 0:
        body = f"{w} {_pick(rng, ('may', 'can', 'will', 'might', 'could'))} " + _pick(rng, (
            "vary", "differ", "change", "matter", "depend on context", "be debated", "be complex", "surprise"))
    elif form == 1:
        body = _pick(rng, ("it depends on ", "it varies with ", "much turns on ", "a lot rides on ",
                           "much hinges on ", "it all comes back to ", "so much rests on ")) + w
    elif form == 2:
        body = f"{_pick(rng, SHORT_SUBJECTS)} {_pick(rng, SHORT_VERBS)}"
    elif form == 3:
        body = f"{_pick(rng, SHORT_FACTORS)} " + _pick(rng, ("matters", "counts", "helps", "decides much", "weighs"))
    elif form == 4:
        body = f"{_pick(rng, ('it', 'that', 'this'))} " + _pick(rng, ("depends", "varies", "is debated", "is subtle",
                                                                   "can differ", "is hard to say", "is unclear"))
    else:
        body = f"{w} {_pick(rng, ('is', 'seems', 'remains', 'looks'))} " + _pick(rng, (
            "debated", "complex", "subtle", "contested", "nuanced", "a big topic", "many-sided", "open"))
    return body[0].upper() + body[1:] + "."


def _generic(rng: np.random.Generator, response: str, instruction: str, inp: str) -> str:
    """Sentences of a seeded grammar that talk around a few of the prompt's topic words, as long as `response`."""
    words = _topic_words(rng, instruction, inp)
    used: set = set()
    for _ in range(10):  # on topic: a draw that names one of the topic words, if any fits
        text = _compose(rng, len(response), lambda r: _generic_sentence(r, words, used),
                        lambda r: _generic_short(r, words))
        if any(w.lower() in text.lower() for w in words):
            break
    return text


# restatement: the prompt said again, in other words
LEADS = ("so", "in short", "put simply", "basically", "essentially", "as I read it", "if I understand it",
         "in other words", "to restate it", "put another way", "stated plainly", "reading it closely", "at bottom",
         "simply put", "to put it differently", "to be clear", "in plain terms", "as I see it", "to spell it out",
         "once more", "again", "that is", "in brief", "to sum up the ask", "plainly", "at heart", "to repeat")
TASK_NOUNS = ("task", "request", "assignment", "job", "exercise", "ask", "prompt", "brief", "challenge",
              "instruction", "question", "problem")
VERB_SYNONYMS = {
    "generate": ("come up with", "produce", "put together"), "write": ("compose", "put together", "draft"),
    "explain": ("spell out", "account for", "make clear"), "describe": ("give an account of", "portray", "depict"),
    "list": ("set out", "enumerate", "name"), "create": ("put together", "produce", "come up with"),
    "give": ("provide", "offer", "supply"), "identify": ("pick out", "point out", "single out"),
    "classify": ("sort", "categorise", "label"), "summarize": ("sum up", "condense", "give the gist of"),
    "rewrite": ("rephrase", "redo", "recast"), "find": ("work out", "track down", "determine"),
    "suggest": ("propose", "put forward", "recommend"), "compose": ("write", "draft", "put together"),
    "translate": ("render", "put"), "convert": ("turn", "change"), "edit": ("revise", "correct", "fix"),
    "construct": ("build", "put together", "form"), "design": ("come up with", "devise", "plan"),
    "provide": ("give", "offer", "supply"), "compare": ("contrast", "weigh up", "set side by side"),
    "name": ("list", "mention", "give"), "analyze": ("examine", "look into", "break down"),
    "calculate": ("compute", "work out", "figure out"), "make": ("produce", "create", "put together"),
    "categorize": ("sort", "classify", "group"), "evaluate": ("assess", "judge", "weigh up"),
    "develop": ("work out", "build", "shape")}
IMPERATIVES = frozenset(VERB_SYNONYMS) | frozenset("""
predict choose select arrange sort add delete remove replace insert change brainstorm imagine research estimate
formulate paraphrase transform fill complete detect decide output reword restate rank group match organize
organise draft produce devise invent pick assess discuss recommend state define illustrate demonstrate show
determine outline propose take use read look pretend think consider answer divide reverse combine count cite
explore shorten expand simplify check correct order come tell explain""".split())
PLACES = ("here", "at hand", "as given", "as stated", "in question", "before us", "as set out", "we have been given",
          "in front of us", "as posed", "we face", "as worded")
ASKED = ("being asked", "asked", "meant", "expected", "supposed", "invited", "told", "required", "called upon")
ASKS = ("asks", "wants", "requires", "expects", "calls on", "invites", "tells", "needs")
BOILS = ("boils down to", "comes down to", "amounts to", "is", "reduces to", "is basically")
WHO_NEEDS = ("we need", "one needs", "I need", "we have", "one has", "we are meant", "the reply has")
QUESTION_PUT = ("posed", "being asked", "put to us", "raised here", "on the table", "at hand", "in front of us",
                "as I read it", "asked")
QUESTION_IS = ("this", "simply this", "essentially this", "as follows", "roughly this", "the following")
WORK_OUT = ("work out", "figure out", "answer", "settle", "address", "establish", "get at", "resolve")
AS_WRITTEN = ("as written", "as it stands", "as given", "word for word", "in its own words", "as stated",
              "in full", "verbatim")
READS = ("reads", "says", "runs", "goes")
MATERIAL = ("the material", "what we are given", "the input", "the starting point", "the text supplied",
            "the data provided", "the example given", "what comes with it", "the content supplied",
            "the given material")
MATERIAL_IS = ("is", "reads", "runs", "comes to", "is as follows", "looks like this")
COMES_WITH = ("it comes with", "we are given", "this comes with", "we also have", "there is also", "we get",
              "it includes", "attached is")
THIS_INPUT = ("the following", "this", "this input", "this material", "the text below", "this content")
CENTRES_ON = ("centres on", "is about", "concerns", "revolves around", "comes back to", "focuses on",
              "is really about", "deals with", "has to do with", "is built around", "turns on", "targets",
              "is aimed at", "circles")
WANTED = ("is wanted", "is needed", "is called for", "is expected", "is being sought", "is asked for",
          "is required", "they want", "is sought", "is due")
A_REPLY = ("a response", "an answer", "something", "a reply", "a write-up", "some text", "a result",
           "an output", "a few lines")
ADDRESSES = ("addresses", "deals with", "speaks to", "covers", "takes up", "engages with", "responds to",
             "says something about", "handles", "touches on", "treats")
AIMS = ("the point", "the aim", "the goal", "the idea", "the purpose", "the intent", "the hope", "the plan")
AIM_IS = ("is to", "is simply to", "is really to", "is mainly to", "would be to", "seems to be to")
ADDRESS = ("address", "look at", "deal with", "take up", "consider", "cover", "work through", "respond to",
           "handle", "engage with", "treat", "discuss")
AS_ASKED = ("", " as asked", " as requested", " in the way described", " along the lines given",
            " as the prompt puts it", " and nothing else", " directly", " with care", " in some form")
MENTION = ("the mention", "any mention", "the reference", "the use", "the presence", "the naming", "the choice")
SIGNALS = ("suggests", "signals", "indicates", "tells us", "makes clear", "shows", "implies", "hints")
CENTRAL = ("is central", "matters here", "is the focus", "is the key element", "sits at the centre",
           "should not be ignored", "is what counts", "carries weight", "is essential")
WHO = ("we are", "one is", "the reader is", "the writer is", "the answer is", "the reply is", "I am")
EXPECTED = ("asked", "expected", "meant", "supposed", "invited", "required")
STAY = ("keep", "stay", "remain")
FOCUSED = ("focused on", "close to", "centred on", "attentive to", "mindful of", "tied to", "fixed on")
MENTIONS = ("mentions", "names", "brings up", "refers to", "points to", "includes", "singles out", "stresses")
THAT_IS = ("that is", "this is", "this seems", "that seems", "that must be", "this looks like")
FOCUS = ("where the focus lies", "what matters most", "the heart of it", "the part to address", "what it hinges on",
         "the thing to study", "the crux", "the centre of it", "the core", "the real subject")
SHORT_RESTATING = ("that is {task}", "this is {task}", "it is about {w}", "the focus is {w}", "the key is {w}",
                   "it concerns {w}", "it centres on {w}", "{w} is the focus", "{w}, in short",
                   "nothing more is asked", "little more is asked", "that is all", "that is the gist", "so: {w}",
                   "{w} matters here", "the core is {w}", "all about {w}")
SHORT_TASKS = ("the task", "the request", "the ask", "what is wanted", "the point", "the brief", "the job")
COMPACT = ("The task: {}", "Task: {}", "In short: {}", "Asked: {}", "The ask: {}", "Namely: {}", "So: {}",
           "Request: {}", "The brief: {}", "In brief: {}", "Put simply: {}", "Prompt: {}")


def _lower_first(text: str) -> str:
    first = text.split()[0] if text.split() else ""
    if len(first) > 1 and (first[1].isupper() or first == "I"):
        return text
    return text[:1].lower() + text[1:]


def _restate_prompt(rng: np.random.Generator, instruction: str, used: set) -> str:
    """The instruction said again through a seeded frame, its verb sometimes swapped for a synonym."""
    text = " ".join(instruction.split())
    body = text.rstrip(".!?:; ")
    first = re.sub(r"[^a-z]", "", body.split()[0].lower()) if body else ""
    noun = _pick(rng, TASK_NOUNS)
    if text.endswith("?") or first in QUESTION_WORDS:
        q = _lower_first(body)
        form = int(rng.integers(3))
        if form == 0:
            frame = f"the question {_pick(rng, QUESTION_PUT)} is {_pick(rng, QUESTION_IS)}: {q}"
            return _say(rng, LEADS, frame, lead_p=0.6, end="?", used=used)
        if form == 1:
            frame = f"what {_pick(rng, WHO_NEEDS)} to {_pick(rng, WORK_OUT)} is {_pick(rng, QUESTION_IS)}: {q}"
            return _say(rng, LEADS, frame, lead_p=0.4, end="?", used=used)
        frame = f"{_pick(rng, WHO)} {_pick(rng, ASKED)} to {_pick(rng, WORK_OUT)} {_pick(rng, QUESTION_IS)}: {q}"
        return _say(rng, LEADS, frame, lead_p=0.7, end="?", used=used)
    if first in IMPERATIVES:
        x = _lower_first(body)
        if first in VERB_SYNONYMS and rng.random() < 0.6:
            x = _pick(rng, VERB_SYNONYMS[first]) + x[len(body.split()[0]):]
        form = int(rng.integers(6))
        if form == 0:
            frame = f"the {noun} {_pick(rng, PLACES)} is to {x}"
        elif form == 1:
            frame = (f"what is being asked, {_pick(rng, LEADS)}, is "
                     + _pick(rng, ("to ", "for us to ", "that we ", "simply to ")) + x)
        elif form == 2:
            frame = f"{_pick(rng, WHO)} {_pick(rng, ASKED)} to {x}"
        elif form == 3:
            frame = f"the {noun} {_pick(rng, ASKS)} us to {x}"
        elif form == 4:
            frame = f"the {noun} {_pick(rng, BOILS)} this: {x}"
        else:
            frame = f"what {_pick(rng, WHO_NEEDS)} to do is {x}"
        return _say(rng, LEADS, frame, lead_p=0.0 if form == 1 else 0.6, used=used)
    quoted = text if text[-1:] in ".!?" else text + "."
    if rng.random() < 0.5:
        return _say(rng, LEADS, f"the {noun} {_pick(rng, AS_WRITTEN)} {_pick(rng, READS)}: {quoted}", lead_p=0.7,
                    end="", used=used)
    return _say(rng, LEADS, f"the {noun} {_pick(rng, PLACES)} {_pick(rng, READS)}, "
                f"{_pick(rng, ('more or less', 'roughly', 'in full', 'word for word', 'in effect'))}: {quoted}",
                lead_p=0.2, end="", used=used)


def _restate_input(rng: np.random.Generator, inp: str) -> str:
    text = inp.strip()
    text = text if text[-1:] in ".!?" else text + "."
    if rng.random() < 0.6:
        lead = _pick(rng, ("", "", "and ", "here ", "for reference, ", "beyond that, ", "alongside it, ", "also, "))
        body = f"{lead}{_pick(rng, MATERIAL)} {_pick(rng, MATERIAL_IS)}: {text}"
    else:
        body = f"{_pick(rng, COMES_WITH)} {_pick(rng, THIS_INPUT)}: {text}"
    return body[0].upper() + body[1:]


def _restating_sentence(rng: np.random.Generator, words: list[str], instruction: str, state: dict) -> str:
    form = int(rng.integers(7))
    topic = _topic(rng, words)
    noun = _pick(rng, TASK_NOUNS)
    used = state["used"]
    if form == 6 and not state.get("again"):
        state["again"] = True
        return _restate_prompt(rng, instruction, used)
    if form == 0:
        return _say(rng, LEADS, f"the {noun} {_pick(rng, CENTRES_ON)} {topic}", used=used)
    if form == 1:
        body = f"what {_pick(rng, WANTED)} is {_pick(rng, A_REPLY)} that {_pick(rng, ADDRESSES)} {topic}"
        return _say(rng, LEADS, body, lead_p=0.4, used=used)
    if form == 2:
        body = f"{_pick(rng, AIMS)} {_pick(rng, AIM_IS)} {_pick(rng, ADDRESS)} {topic}{_pick(rng, AS_ASKED)}"
        return _say(rng, LEADS, body, lead_p=0.4, used=used)
    if form == 3:
        w = _pick(rng, tuple(words))
        others = [o for o in words if o != w]
        that = _pick(rng, tuple(others)) if others and rng.random() < 0.5 else "it"
        body = f"{_pick(rng, MENTION)} of {w} {_pick(rng, SIGNALS)} that {that} {_pick(rng, CENTRAL)}"
        return _say(rng, LEADS, body, lead_p=0.2, used=used)
    if form == 4:
        body = f"{_pick(rng, WHO)} {_pick(rng, EXPECTED)} to {_pick(rng, STAY)} {_pick(rng, FOCUSED)} {topic}"
        return _say(rng, LEADS, body, used=used)
    body = (f"the {noun} {_pick(rng, MENTIONS)} {topic}, {_pick(rng, ('and', 'so'))} {_pick(rng, THAT_IS)} "
            f"{_pick(rng, FOCUS)}")
    return _say(rng, LEADS, body, lead_p=0.2, used=used)


def _restating_short(rng: np.random.Generator, words: list[str]) -> str:
    body = _pick(rng, SHORT_RESTATING).format(w=_pick(rng, tuple(words)), task=_pick(rng, SHORT_TASKS))
    return body[0].upper() + body[1:] + "."


def _restatement(rng: np.random.Generator, response: str, instruction: str, inp: str) -> str:
    """The instruction (and input) restated through seeded frames, then more restating, as long as `response`."""
    words = _topic_words(rng, instruction, inp)
    state: dict = {"used": set()}
    start = _restate_prompt(rng, instruction, state["used"])
    if inp.strip():
        start += " " + _restate_input(rng, inp)
    if len(start) > _bounds(len(response))[1]:  # a short response: the instruction in a compact frame, cut to fit
        body = _lower_first(" ".join(instruction.split()).rstrip(".!?:; "))
        start = _pick(rng, COMPACT).format(body)
    return _compose(rng, len(response), lambda r: _restating_sentence(r, words, instruction, state),
                    lambda r: _restating_short(r, words), start=start)


# wrong_facts: the response, confidently wrong
ANTONYM_PAIRS = (
    ("more", "less"), ("increase", "decrease"), ("increases", "decreases"), ("increased", "decreased"),
    ("increasing", "decreasing"), ("true", "false"), ("before", "after"), ("high", "low"), ("higher", "lower"),
    ("highest", "lowest"), ("large", "small"), ("larger", "smaller"), ("largest", "smallest"), ("hot", "cold"),
    ("warm", "cool"), ("positive", "negative"), ("always", "never"), ("best", "worst"), ("better", "worse"),
    ("good", "bad"), ("fast", "slow"), ("faster", "slower"), ("up", "down"), ("first", "last"), ("early", "late"),
    ("easy", "difficult"), ("strong", "weak"), ("rich", "poor"), ("inside", "outside"), ("north", "south"),
    ("east", "west"), ("add", "remove"), ("open", "closed"), ("love", "hate"), ("happy", "sad"), ("long", "short"),
    ("longer", "shorter"), ("heavy", "light"), ("young", "old"), ("cheap", "expensive"), ("safe", "dangerous"),
    ("legal", "illegal"), ("maximum", "minimum"), ("above", "below"), ("major", "minor"), ("win", "lose"),
    ("gain", "loss"), ("yes", "no"), ("correct", "incorrect"), ("agree", "disagree"), ("possible", "impossible"),
    ("common", "rare"), ("often", "rarely"), ("many", "few"), ("most", "least"), ("can", "cannot"),
    ("include", "exclude"), ("rise", "fall"), ("rises", "falls"), ("improve", "worsen"), ("improves", "worsens"),
    ("benefit", "harm"), ("success", "failure"), ("successful", "unsuccessful"), ("important", "unimportant"),
    ("formal", "informal"), ("active", "passive"), ("natural", "artificial"), ("simple", "complex"), ("wet", "dry"),
    ("internal", "external"), ("past", "future"), ("same", "different"), ("start", "end"), ("top", "bottom"),
    ("left", "right"), ("reduce", "raise"), ("reduces", "raises"), ("lowest", "highest"), ("old", "new"),
    ("dark", "bright"), ("quickly", "slowly"), ("easily", "hardly"), ("healthy", "unhealthy"), ("full", "empty"),
    ("buy", "sell"), ("accept", "reject"), ("allow", "forbid"), ("victory", "defeat"),
    ("ancient", "modern"), ("private", "public"), ("visible", "invisible"), ("likely", "unlikely"),
)


def _opposites(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Each word of `pairs` to its opposite; a word in several pairs keeps its first."""
    out: dict[str, str] = {}
    for a, b in pairs:
        out.setdefault(a, b)
        out.setdefault(b, a)
    return out


ANTONYMS = _opposites(ANTONYM_PAIRS)
# words of every length from 2 to 16, so that a word of any such length can always be swapped for another
FALLBACK_WORDS = ("on", "at", "fox", "map", "lamp", "rock", "stone", "grain", "garden", "pocket", "blanket",
                  "harvest", "elephant", "mountain", "cardboard", "telescope", "television", "submarines",
                  "electricity", "temperature", "temperatures", "transmission", "neighborhoods", "communication",
                  "international", "transportation", "microorganisms", "responsibilities", "representatives",
                  "accomplishments", "characterization", "interdisciplinary")
_SUFFIXES = ("ing", "ed", "ly", "tion", "sion", "ness", "ment", "ful", "ous", "ive", "able", "al", "er", "est",
             "ity", "s")
_ENTITY = re.compile(r"[A-Z][a-z]+")


def _suffix(word: str) -> str:
    return next((s for s in _SUFFIXES if word.endswith(s) and not word.endswith("ss")), "")


def _cased(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[0].upper() + word[1:] if like[0].isupper() else word.lower()


def _other_number(rng: np.random.Generator, digits: str) -> str:
    """A different number with as many digits (no leading zero added)."""
    while True:
        first = str(int(rng.integers(10))) if len(digits) == 1 or digits[0] == "0" else str(int(rng.integers(1, 10)))
        new = first + "".join(str(int(d)) for d in rng.integers(10, size=len(digits) - 1))
        if new != digits:
            return new


def _donor_words(texts: list[str], own: set[str]) -> tuple[list[str], list[str]]:
    """(capitalised words that do not open a sentence, lower-case content words) of `texts`, in order, each once,
    none of them a word of `own` (lower-cased)."""
    caps: dict[str, None] = {}
    vocab: dict[str, None] = {}
    for text in texts:
        for m in _TOKEN.finditer(text):
            word = m.group()
            if word.lower() in own or word.lower() in ANTONYMS:
                continue
            if _ENTITY.fullmatch(word) and not _initial(text, m.start()):
                caps[word] = None
            elif word.isalpha() and word.islower() and len(word) >= 4 and word not in STOPWORDS:
                vocab[word] = None
    return list(caps), list(vocab)


def _wrong_facts(rng: np.random.Generator, response: str, donors: list[str]) -> str:
    """`response` with numbers altered (same number of digits), capitalised words inside sentences replaced by
    capitalised words of other records' responses, and words turned into their antonyms or swapped for other
    records' words (same ending, similar length); every change keeps the length within 10%; at least one."""
    lo, hi = _bounds(len(response))
    picked = rng.permutation(len(donors))[:40] if donors else []
    own = {w.lower() for w in _TOKEN.findall(response)}
    caps, vocab = _donor_words([donors[j] for j in picked], own)
    spans = []  # (start, end, word, category)
    for m in _TOKEN.finditer(response):
        word, low = m.group(), m.group().lower()
        if word.isdigit():
            category = "number"
        elif low in ANTONYMS:
            category = "antonym"
        elif _ENTITY.fullmatch(word) and not _initial(response, m.start()):
            category = "entity"
        elif word.isalpha() and word.islower() and len(word) >= 4 and low not in STOPWORDS:
            category = "content"
        elif len(word) >= 2 and word.replace("'", "").replace("-", "").isalpha():
            category = "word"
        else:
            continue
        spans.append((m.start(), m.end(), word, category))

    def replacement(start: int, word: str, category: str, same_length: bool) -> str | None:
        if category == "number":
            return _other_number(rng, word)
        if category == "antonym":
            return _cased(ANTONYMS[word.lower()], word)
        pool = caps if category == "entity" else vocab if category == "content" else vocab + list(FALLBACK_WORDS)
        options = [w for w in pool if (len(w) == len(word) if same_length else abs(len(w) - len(word)) <= 3)
                   and w.lower() != word.lower()]
        if category != "entity":  # the same ending (-ing, -ed, -s, ...): the sentence still parses
            options = [w for w in options if _suffix(w) == _suffix(word)] or (options if category == "word" else [])
        article = re.search(r"\b(an?)\s+$", response[:start], re.IGNORECASE)
        if article:  # "a" before a consonant, "an" before a vowel
            vowel = article.group(1).lower() == "an"
            options = [w for w in options if (w[0].lower() in "aeiou") == vowel] or options
        return _cased(_pick(rng, tuple(options)), word) if options else None

    chance = {"number": 0.7, "antonym": 0.7, "entity": 0.6, "content": 0.12, "word": 0.0}
    edits: dict[int, tuple[int, str]] = {}  # start -> (end, new word)
    delta = 0

    def accept(start: int, end: int, new: str | None) -> bool:
        nonlocal delta
        if new is None or lo > len(response) + delta + len(new) - (end - start) or \
                len(response) + delta + len(new) - (end - start) > hi:
            return False
        delta += len(new) - (end - start)
        edits[start] = (end, new)
        return True

    for start, end, word, category in spans:
        if rng.random() < chance[category]:
            accept(start, end, replacement(start, word, category, False))
    if not edits:  # at least one change: the first category that allows one, a word of the same length last
        order = {"number": 0, "antonym": 1, "entity": 2, "content": 3, "word": 4}
        ranked = sorted(((order[c], float(rng.random()), s, e, w, c) for s, e, w, c in spans))
        for _, _, start, end, word, category in ranked:
            if accept(start, end, replacement(start, word, category, False)):
                break
        else:
            for _, _, start, end, word, category in ranked:
                if category != "number" and accept(start, end, replacement(start, word, "word", True)):
                    break
    if not edits:
        raise ValueError(f"wrong_facts: nothing to change in {response!r}")
    out, at = [], 0
    for start in sorted(edits):
        end, new = edits[start]
        out += [response[at:start], new]
        at = end
    return "".join(out) + response[at:]


def _instruction_type(instruction: str) -> str:
    """The instruction's first word, lower-cased: "generate", "write", "explain", "classify", ..."""
    m = re.search(r"[A-Za-z]+", instruction)
    return m.group().lower() if m else ""


def _other_question(rng: np.random.Generator, response: str, donors: list[str], instruction: str,
                    donor_instructions: list[str] | None) -> str:
    """The response of another record within 10% of the length, one whose instruction starts with the same word
    when there is one."""
    fits = [j for j, d in enumerate(donors) if d != response and _within(len(d), len(response))]
    if not fits:
        raise ValueError("other_question: no donor response within 10% of the length")
    if donor_instructions is not None:
        kind = _instruction_type(instruction)
        fits = [j for j in fits if _instruction_type(donor_instructions[j]) == kind] or fits
    return donors[fits[int(rng.integers(len(fits)))]]


# --- corrupting and planting ------------------------------------------------------------------------

def applicable_kinds(response: str, kinds: tuple[str, ...], donors: list[str] | None = None) -> list[str]:
    """The kinds of `kinds` that can corrupt `response`, in the order of `kinds`: truncated, shuffled, generic and
    restatement need MIN_WORDS words (shuffled two different ones), wrong_facts a number or a word of 2 to 16
    letters, other_question a response of `donors` (other pool records') other than this one within 10% of its
    length (none without donors); mismatched and refusal apply to any response."""
    words = response.split()
    ok = {"mismatched": lambda: True, "refusal": lambda: True,
          "truncated": lambda: len(words) >= MIN_WORDS,
          "shuffled": lambda: len(words) >= MIN_WORDS and len(set(words)) > 1,
          "generic": lambda: len(words) >= MIN_WORDS,
          "restatement": lambda: len(words) >= MIN_WORDS,
          "wrong_facts": lambda: any(w.isdigit() or 2 <= len(w) <= 16 for w in _TOKEN.findall(response)),
          "other_question": lambda: donors is not None and any(
              d != response and _within(len(d), len(response)) for d in donors)}
    return [k for k in kinds if ok[k]()]


def corrupt(rng: np.random.Generator, kind: str, response: str, donors: list[str], instruction: str = "",
            inp: str = "", donor_instructions: list[str] | None = None) -> str:
    """`response` (the raw response, before any packaging) corrupted by `kind`. `donors` are other pool records'
    responses (mismatched, wrong_facts, other_question) and `donor_instructions` their instructions, in the same
    order (other_question); `instruction` and `inp` are the record's own prompt (generic, restatement,
    other_question). Pure: a function of its arguments and the state of `rng`."""
    if kind == "mismatched":
        others = [d for d in donors if d != response]
        return others[int(rng.integers(len(others)))]
    if kind == "truncated":
        words = response.split()
        cut = " ".join(words[:max(1, int(len(words) * rng.uniform(0.15, 0.4)))])
        return cut.rstrip(".!?,;:") or cut
    if kind == "shuffled":
        words = response.split()
        while True:
            shuffled = [words[i] for i in rng.permutation(len(words))]
            if shuffled != words:
                return " ".join(shuffled)
    if kind == "refusal":
        return _pick(rng, REFUSALS)
    if kind == "generic":
        return _generic(rng, response, instruction, inp)
    if kind == "wrong_facts":
        return _wrong_facts(rng, response, donors)
    if kind == "other_question":
        return _other_question(rng, response, donors, instruction, donor_instructions)
    if kind == "restatement":
        return _restatement(rng, response, instruction, inp)
    raise ValueError(f"unknown corruption kind {kind!r} (known: {', '.join(KINDS)})")


def plant_raw(records: list[dict], protocol: str, seed: int, pool_size: int = 1000, dev_size: int = 32,
              bad_sources: int = 1, bad_rate: float = 0.85, background_rate: float = 0.02,
              scattered_rate: float = 0.2, kinds: tuple[str, ...] = LOSS_KINDS) -> list[dict]:
    """The pool's base records with what was planted in them, before packaging: {instruction, input, output
    (Alpaca's), response (the planted raw response; the output when clean), source, bad_source, corrupted, kind,
    alpaca_index}, in pool order. See the module docstring."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"kinds: a non-empty subset of {', '.join(KINDS)}, got {kinds}")
    names = list(SOURCES)
    if protocol == "concentrated" and not 1 <= bad_sources <= len(names) - 1:
        raise ValueError(f"bad_sources: 1 to {len(names) - 1} (plain is never bad), got {bad_sources}")
    base, _ = split(records, seed, pool_size, dev_size)
    n = len(base)
    rng = np.random.default_rng([seed, 2])
    source = np.empty(n, dtype=int)
    source[rng.permutation(n)] = np.arange(n) % len(names)
    bad = set(rng.choice(np.arange(1, len(names)), size=bad_sources, replace=False).tolist()) \
        if protocol == "concentrated" else set()
    donors = [r["output"] for r in base]  # donor material: the pool's base records, never a dev record
    prompts = [r["instruction"] for r in base]
    usable = np.array([bool(applicable_kinds(r["output"], kinds, donors)) for r in base])
    groups = [(np.arange(n), scattered_rate)] if protocol == "scattered" else \
        [(np.flatnonzero(source == s), bad_rate if s in bad else background_rate) for s in range(len(names))]
    corrupted = np.zeros(n, dtype=bool)
    for members, rate in groups:
        count = int(round(rate * len(members)))
        candidates = members[usable[members]]
        if count > len(candidates):
            raise ValueError(f"{count} records to corrupt but only {len(candidates)} allow kinds {kinds}")
        corrupted[rng.permutation(candidates)[:count]] = True
    rows = []
    for i, r in enumerate(base):
        kind, response = "", r["output"]
        if corrupted[i]:
            crng = np.random.default_rng([seed, 4, i])
            options = applicable_kinds(response, kinds, donors)
            kind = options[int(crng.integers(len(options)))]
            response = corrupt(crng, kind, response, donors[:i] + donors[i + 1:], r["instruction"], r["input"],
                               prompts[:i] + prompts[i + 1:])
        rows.append({"instruction": r["instruction"], "input": r["input"], "output": r["output"], "response": response,
                     "source": names[source[i]], "bad_source": bool(source[i] in bad), "corrupted": bool(corrupted[i]),
                     "kind": kind, "alpaca_index": r["alpaca_index"]})
    return rows


def plant(records: list[dict], protocol: str, seed: int, pool_size: int = 1000, dev_size: int = 32,
          bad_sources: int = 1, bad_rate: float = 0.85, background_rate: float = 0.02, scattered_rate: float = 0.2,
          kinds: tuple[str, ...] = LOSS_KINDS) -> tuple[list[dict], list[dict]]:
    """(pool records {instruction, input, output}, truth rows {id, source, bad_source, corrupted, kind,
    alpaca_index}), in the same order: `plant_raw`'s records packaged by their source's style. See the module
    docstring. Pure: a function of its arguments."""
    from shed.data import record_id

    rows = plant_raw(records, protocol, seed, pool_size, dev_size, bad_sources, bad_rate, background_rate,
                     scattered_rate, kinds)
    pool, truth, seen = [], [], set()
    for i, r in enumerate(rows):
        style = SOURCES[r["source"]]
        srng = np.random.default_rng([seed, 3, i])
        instruction, inp = style(srng, r["instruction"], r["input"])
        output = style(srng, r["instruction"], r["input"], r["response"])
        rid = record_id(instruction, inp, output)
        if rid in seen:  # cannot happen with distinct prompts; a guard, since the truth file is keyed by id
            raise ValueError(f"two planted records share id {rid}")
        seen.add(rid)
        pool.append({"instruction": instruction, "input": inp, "output": output})
        truth.append({"id": rid, "source": r["source"], "bad_source": r["bad_source"], "corrupted": r["corrupted"],
                      "kind": r["kind"], "alpaca_index": r["alpaca_index"]})
    return pool, truth
