"""Turn one chat session's history rows into the fields of a stored conversation.

Pure Python: no database, no network, no model download. Histories come in two
JSONB shapes, and both must give the same result:

* n8n / LangChain.js: ``{"type": "human", "content": ..., "additional_kwargs": {...}}``
* langchain-postgres: ``{"type": "human", "data": {"content": ..., "additional_kwargs": {...}}}``

The summary is extractive and deterministic so that re-running a session gives
the same row; sentiment (VADER) and language (py3langid) use lexicons/models
shipped inside their wheels and are loaded once per process.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

_SPEAKERS = {"human": "User", "ai": "Assistant", "system": "System", "tool": "Tool"}

# Sentence ends: Latin terminators need following whitespace (so "3.5" and "e.g.x"
# stay whole); CJK full-width terminators end a sentence on their own because
# CJK text has no spaces; newlines always do.
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*|\s*\n\s*")
_WORD = re.compile(r"\w+")
# Han, kana (Japanese) and CJK compatibility ideographs: written without spaces, so a
# ``\w+`` run is a whole clause; character bigrams stand in for words there.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

_MAX_SENTIMENT_MESSAGES = 50
# VADER's time grows with the square of a text's length (1,000 characters of emoji and
# CJK: 8 ms; 40,000: minutes): each message is read up to this, and the messages read
# (newest first) up to the second figure.
_SENTIMENT_CHARS_PER_MESSAGE = 1000
_SENTIMENT_CHARS = 4000
_LANGUAGE_CHARS = 2000
# A language is stored only from this many letters of the user's text and this
# confidence of the model (py3langid's normalised probability); otherwise NULL.
LANGUAGE_MIN_LETTERS = 10
LANGUAGE_MIN_CONFIDENCE = 0.5
_CACHED_TEXT_CHARS = 200
_LEAD_BONUS = 1.5

# Small function-word lists for en/fr/es/de/pt: enough to stop "the"/"de"/"und"
# from dominating word frequencies; single-character tokens are ignored anyway.
_STOPWORDS = frozenset(
    """
    about above after again all also am an and any are as at be because been before being
    both but by can could did do does doing don down during each few for from further had
    has have having he her here hers him his how if in into is it its itself just let me
    more most my no nor not now of off on once only or other our ours out over own same
    she should so some such than that the their theirs them then there these they this
    those through to too under until up very was we were what when where which while who
    whom why will with would you your yours im ive ll re ve hi hello hey please thanks
    thank ok okay yes
    au aux avec ce ces cette dans des du elle elles en est et eux il ils je la le les leur
    lui ma mais me mes moi mon ne nos notre nous on ou par pas pour qu que qui sa se ses
    son sur ta te tes toi ton tu un une vos votre vous été être avoir ai as avons avez ont
    suis es sommes êtes sont bonjour merci
    al algo como con de del el ella ellos en entre era es esa ese eso esta este esto está
    estoy fue ha hay la las le les lo los más mi mis muy nos para pero por que se sin sobre
    su sus también te tengo ti tu tus un una uno unos usted yo hola gracias
    aber als am an auch auf aus bei bin bis bist das dass dem den der des die dich dir du
    ein eine einem einen einer es für hat hatte ich ihr im in ist ja kann mein meine mich
    mir mit nach nicht noch nur oder sein sich sie sind so über um und uns von vor war
    warum was weil wie wir wird zu zum zur hallo danke bitte
    ao aos as com da das do dos ela ele eles em essa esse esta este eu isso mas meu minha
    na nas no nos não os ou para pela pelo por quando se sem seu sua são também te tem um
    uma você olá obrigado obrigada
    """.split()
)


@dataclass(frozen=True)
class SessionMessage:
    """One histories row of a session; ``id`` (not input order) gives the order."""

    id: int
    message: Any
    created_at: datetime | None


@dataclass(frozen=True)
class ConversationContent:
    """The computed columns of one stored conversation."""

    full_conversation: str
    summary: str
    user_id: str | None
    channel: str | None
    handed_off: bool
    metadata: dict[str, Any]


def _data(message: Any) -> dict[str, Any] | None:
    """The nested langchain-postgres payload, when the message has one."""
    if isinstance(message, dict):
        data = message.get("data")
        if isinstance(data, dict):
            return data
    return None


def _field(message: Any, key: str) -> Any:
    """A key at the top level (n8n shape), else under ``data`` (langchain-postgres)."""
    if not isinstance(message, dict):
        return None
    value = message.get(key)
    if value is None:
        data = _data(message)
        if data is not None:
            value = data.get(key)
    return value


def _kwargs(message: Any) -> Iterable[dict[str, Any]]:
    """Every ``additional_kwargs`` dict of a message, top level first."""
    if not isinstance(message, dict):
        return ()
    found = []
    for holder in (message, _data(message)):
        if holder is not None:
            kwargs = holder.get("additional_kwargs")
            if isinstance(kwargs, dict):
                found.append(kwargs)
    return found


def message_text(message: Any) -> str:
    """The readable text of a message; multimodal parts keep only their text parts."""
    content = _field(message, "content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
        return " ".join(text for text in texts if text.strip())
    return ""


def speaker(message: Any) -> str:
    """The transcript label: known LangChain types by role, others as their own label."""
    kind = _field(message, "type")
    if not isinstance(kind, str) or not kind.strip():
        return "Unknown"
    kind = kind.strip()
    known = _SPEAKERS.get(kind.lower())
    if known is not None:
        return known
    return kind[0].upper() + kind[1:]


def _ordered(messages: Sequence[SessionMessage]) -> list[SessionMessage]:
    """Messages by source row id; input order is not trusted."""
    return sorted(messages, key=lambda m: m.id)


def _clean(text: str) -> str:
    """Normalised line endings, without surrounding blank space."""
    return text.replace("\r\n", "\n").strip()


def _lines(rows: Sequence[SessionMessage]) -> list[tuple[str, str]]:
    """(speaker, cleaned text) of every dict message in the given order, text possibly empty."""
    return [
        (speaker(row.message), _clean(message_text(row.message)))
        for row in rows
        if isinstance(row.message, dict)
    ]


def _render(lines: Sequence[tuple[str, str]]) -> str:
    """The transcript text; messages without text are left out."""
    return "\n".join(f"{label}: {text}" for label, text in lines if text)


def build_transcript(messages: Sequence[SessionMessage]) -> str:
    """``Speaker: text`` blocks in id order; messages without text are left out."""
    return _render(_lines(_ordered(messages)))


def _sentences(text: str) -> list[str]:
    """Sentences of one message, by terminator punctuation and newlines."""
    parts = _SENTENCE_SPLIT.split(text.replace("\r\n", "\n"))
    return [part.strip() for part in parts if part and part.strip()]


def _words(sentence: str) -> list[str]:
    """Word tokens of a lowercased sentence; unspaced CJK runs become character bigrams."""
    words = _WORD.findall(sentence)
    if not _CJK.search(sentence):
        return words
    split: list[str] = []
    for word in words:
        if len(word) > 2 and _CJK.search(word):
            split.extend(word[i : i + 2] for i in range(len(word) - 1))
        else:
            split.append(word)
    return split


def _truncate(text: str, max_chars: int) -> str:
    """Cut to ``max_chars`` (ellipsis included) at a word boundary when there is one."""
    if len(text) <= max_chars:
        return text
    if max_chars <= 1:
        return "…"[:max_chars]
    cut = text[: max_chars - 1]
    space = cut.rfind(" ")
    if space > max_chars // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:-") + "…"


def extractive_summary(
    texts: Sequence[str],
    max_sentences: int = 3,
    max_chars: int = 400,
    *,
    lead: int | None = 0,
) -> str:
    """The conversation's most central sentences, in their original order.

    Deterministic frequency scoring (sum of the sentence's word frequencies over
    all ``texts`` divided by sqrt of its word count, ties by position). The first
    sentence with content words in ``texts[lead]`` (the user's opening message)
    gets a bonus so the summary starts from what was asked; ``lead=None`` disables it.
    """
    if max_sentences <= 0 or max_chars <= 0:
        return ""
    sentences: list[str] = []
    tokens: list[tuple[list[str], int]] = []  # (content words, word count)
    lead_position: int | None = None
    seen: set[str] = set()
    frequencies: Counter[str] = Counter()
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            continue
        for sentence in _sentences(text):
            key = sentence.lower()
            if key in seen:  # a repeated line (greeting, canned reply) counts once
                continue
            seen.add(key)
            words = _words(key)
            content = [w for w in words if len(w) > 1 and w not in _STOPWORDS]
            frequencies.update(content)
            if lead_position is None and index == lead and content:
                lead_position = len(sentences)
            sentences.append(sentence)
            tokens.append((content, len(words)))
    if not sentences:
        return ""

    scored = []
    for position, (content, count) in enumerate(tokens):
        score = sum(frequencies[w] for w in content) / math.sqrt(count) if count else 0.0
        if position == lead_position:
            score *= _LEAD_BONUS
        scored.append((-score, position))
    chosen = sorted(position for _, position in sorted(scored)[:max_sentences])
    summary = ""
    for position in chosen:
        sentence = sentences[position]
        # CJK sentences follow each other without a space, as they are written
        summary += sentence if not summary or summary[-1] in "。！？" else " " + sentence
    return _truncate(summary, max_chars)


@lru_cache(maxsize=1)
def _analyzer() -> Any:
    """VADER's analyser; it reads its lexicon files, so build it once per process."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _vader(text: str) -> tuple[float, float, float, float]:
    """VADER's (compound, pos, neu, neg) for one message."""
    scores = _analyzer().polarity_scores(text)
    return scores["compound"], scores["pos"], scores["neu"], scores["neg"]


_vader_short = lru_cache(maxsize=8192)(_vader)


def _polarity(text: str) -> tuple[float, float, float, float]:
    """Short replies ("thanks", "ok") repeat across sessions, so they are cached; long ones
    are not, which keeps the cache's memory small."""
    return _vader_short(text) if len(text) <= _CACHED_TEXT_CHARS else _vader(text)


def sentiment(texts: Sequence[str]) -> dict[str, float]:
    """Mean VADER scores over the last non-empty texts (meant for the user's messages):
    at most 50, each up to 1,000 characters, 4,000 in all."""
    usable: list[str] = []
    budget = _SENTIMENT_CHARS
    for text in reversed(texts):
        if not isinstance(text, str) or not text.strip():
            continue
        if budget <= 0 or len(usable) == _MAX_SENTIMENT_MESSAGES:
            break
        kept = text.strip()[: min(_SENTIMENT_CHARS_PER_MESSAGE, budget)]
        usable.append(kept)
        budget -= len(kept)
    if not usable:
        return {"compound": 0.0, "pos": 0.0, "neu": 1.0, "neg": 0.0}
    totals = [0.0, 0.0, 0.0, 0.0]
    for text in usable:
        for i, value in enumerate(_polarity(text)):
            totals[i] += value
    n = len(usable)
    compound, pos, neu, neg = (round(total / n, 4) for total in totals)
    return {"compound": compound, "pos": pos, "neu": neu, "neg": neg}


@lru_cache(maxsize=1)
def _identifier() -> Any:
    """py3langid's identifier with normalised probabilities, loaded once per process."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def guess_language(text: str) -> tuple[str | None, float]:
    """ISO 639-1 code and probability for ``text``, or no language when the guess is
    noise: (None, 0.0) under LANGUAGE_MIN_LETTERS letters (the model is not asked), and
    (None, its confidence) when the model is less sure than LANGUAGE_MIN_CONFIDENCE.

    Short texts give py3langid nothing to go on: "msg 0 ✓ / reply 0" came out as Welsh
    at 0.07, "hello" as Breton, "Hi there" as English at 0.11; from about ten letters
    of real words its normalised probability passes 0.5 ("ok thanks bye" 0.63, "Where
    is my order?" 0.92), while a word or two stays below it."""
    if not isinstance(text, str):
        return None, 0.0
    sample = text[:_LANGUAGE_CHARS]
    letters = 0
    for char in sample:  # stops at the threshold: long texts cost nothing here
        if char.isalpha():
            letters += 1
            if letters == LANGUAGE_MIN_LETTERS:
                break
    else:
        return None, 0.0
    code, confidence = _identifier().classify(sample)
    if confidence < LANGUAGE_MIN_CONFIDENCE:
        return None, float(confidence)
    return str(code), float(confidence)


def _kwarg(found: str | None, kwargs: dict[str, Any], key: str) -> str | None:
    """``found`` if already set, else ``kwargs[key]`` when a non-empty string or an integer."""
    if found is not None:
        return found
    value = kwargs.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _duration(rows: Sequence[SessionMessage]) -> float | None:
    """Seconds from the first to the last message (by id) when both have a timestamp."""
    if not rows:
        return None
    first, last = rows[0].created_at, rows[-1].created_at
    if first is None or last is None:
        return None
    try:
        return (last - first).total_seconds()
    except TypeError:  # naive and aware timestamps mixed
        return None


def build_content(messages: Sequence[SessionMessage]) -> ConversationContent:
    """Everything stored for a session, computed from its rows alone, in one pass."""
    rows = _ordered(messages)
    lines = _lines(rows)
    counts = Counter(label for label, _ in lines)
    human = [text for label, text in lines if label == "User" and text]
    dialogue: list[str] = []  # what the summary is drawn from: the user and the assistant
    lead: int | None = None  # index of the user's first message in ``dialogue``
    for label, text in lines:
        if text and label in ("User", "Assistant"):
            if lead is None and label == "User":
                lead = len(dialogue)
            dialogue.append(text)
    user_id: str | None = None
    channel: str | None = None
    handed_off = False
    for row in rows:
        for kwargs in _kwargs(row.message):
            user_id = _kwarg(user_id, kwargs, "user_id")
            channel = _kwarg(channel, kwargs, "channel")
            handed_off = handed_off or kwargs.get("handoff") is True

    transcript = _render(lines)
    language, confidence = guess_language("\n".join(human)[:_LANGUAGE_CHARS])
    metadata: dict[str, Any] = {
        "message_count": len(rows),
        "human_messages": counts["User"],
        "ai_messages": counts["Assistant"],
        "system_messages": counts["System"],
        "tool_messages": counts["Tool"],
        "first_message_id": rows[0].id if rows else None,
        "last_message_id": rows[-1].id if rows else None,
        "duration_seconds": _duration(rows),
        "language": language,
        "language_confidence": round(confidence, 3),
        "sentiment": sentiment(human),
        "characters": len(transcript),
        "summarizer": "extractive",
    }
    return ConversationContent(
        full_conversation=transcript,
        summary=extractive_summary(dialogue, lead=lead),
        user_id=user_id,
        channel=channel,
        handed_off=handed_off,
        metadata=metadata,
    )
