"""Transcripts, summaries, sentiment and language from session rows: pure Python, no database."""

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conversation_assets.transcripts import (
    LANGUAGE_MIN_CONFIDENCE,
    LANGUAGE_MIN_LETTERS,
    ConversationContent,
    SessionMessage,
    build_content,
    build_transcript,
    extractive_summary,
    guess_language,
    message_text,
    sentiment,
    speaker,
)

START = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)

SUPPORT_CHAT = [
    ("human", "Hi! My order 4512 hasn't arrived yet and the tracking page says delivered."),
    (
        "ai",
        "I'm sorry about that. I checked order 4512: the carrier marked it delivered "
        "yesterday at 14:02. Sometimes a carrier marks an order delivered before it "
        "arrives. Please wait 24 hours; if the order still isn't there, I'll open a claim.",
    ),
    ("human", "OK, thanks. If it doesn't show up I want a refund."),
    ("ai", "Understood. If the order hasn't arrived by tomorrow, we'll refund it in full."),
]


def n8n(kind: str, content: Any, **kwargs: Any) -> dict[str, Any]:
    """The n8n / LangChain.js shape: content at the top level."""
    return {
        "type": kind,
        "content": content,
        "additional_kwargs": kwargs,
        "response_metadata": {},
    }


def langchain(kind: str, content: Any, **kwargs: Any) -> dict[str, Any]:
    """The langchain-postgres shape: everything nested under "data"."""
    return {
        "type": kind,
        "data": {
            "content": content,
            "type": kind,
            "additional_kwargs": kwargs,
            "response_metadata": {},
            "name": None,
            "id": None,
        },
    }


def rows(messages: list[Any], timed: bool = True, first_id: int = 1) -> list[SessionMessage]:
    return [
        SessionMessage(
            id=first_id + i,
            message=message,
            created_at=START + timedelta(seconds=30 * i) if timed else None,
        )
        for i, message in enumerate(messages)
    ]


@pytest.mark.parametrize("shape", [n8n, langchain])
def test_message_text_and_speaker_read_both_shapes(shape):
    assert message_text(shape("human", "Where is my parcel?")) == "Where is my parcel?"
    assert speaker(shape("human", "x")) == "User"
    assert speaker(shape("ai", "x")) == "Assistant"
    assert speaker(shape("system", "x")) == "System"
    assert speaker(shape("tool", "x")) == "Tool"


def test_both_shapes_give_the_same_transcript():
    first = build_transcript(rows([n8n(kind, text) for kind, text in SUPPORT_CHAT]))
    second = build_transcript(rows([langchain(kind, text) for kind, text in SUPPORT_CHAT]))
    assert first == second
    assert first.splitlines()[0] == (
        "User: Hi! My order 4512 hasn't arrived yet and the tracking page says delivered."
    )
    assert first.splitlines()[1].startswith("Assistant: I'm sorry about that.")
    assert len(first.splitlines()) == 4


def test_transcript_follows_ids_not_input_order():
    messages = [
        SessionMessage(30, n8n("ai", "third"), None),
        SessionMessage(10, n8n("human", "first"), None),
        SessionMessage(20, n8n("ai", "second"), None),
    ]
    assert build_transcript(messages) == "User: first\nAssistant: second\nAssistant: third"
    content = build_content(messages)
    assert content.full_conversation == build_transcript(messages)
    assert content.metadata["first_message_id"] == 10
    assert content.metadata["last_message_id"] == 30


@pytest.mark.parametrize("shape", [n8n, langchain])
def test_list_content_keeps_text_parts_only(shape):
    parts = [
        {"type": "text", "text": "What is in"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "this picture?"},
    ]
    assert message_text(shape("human", parts)) == "What is in this picture?"
    assert build_transcript(rows([shape("human", parts)])) == "User: What is in this picture?"


def test_empty_missing_and_null_content_are_left_out():
    messages = [
        n8n("human", "Hello there"),
        n8n("ai", ""),
        n8n("ai", None),
        {"type": "ai", "tool_calls": [{"name": "lookup"}]},  # no content key at all
        langchain("tool", "   \n "),
        {"type": "ai", "data": None},
        n8n("ai", [{"type": "image_url", "image_url": {"url": "x"}}]),
        n8n("ai", 42),
        n8n("ai", "Hi, how can I help?"),
    ]
    assert message_text(n8n("ai", None)) == ""
    assert message_text({"type": "ai"}) == ""
    assert build_transcript(rows(messages)) == "User: Hello there\nAssistant: Hi, how can I help?"
    # the empty ones still count as messages of their type
    metadata = build_content(rows(messages)).metadata
    assert metadata["message_count"] == 9
    assert metadata["ai_messages"] == 7
    assert metadata["tool_messages"] == 1


def test_line_endings_are_normalised_and_inner_newlines_kept():
    transcript = build_transcript(rows([n8n("human", "  line one\r\nline two\n\n")]))
    assert transcript == "User: line one\nline two"


def test_unknown_types_keep_their_own_capitalised_label():
    assert speaker(n8n("AIMessageChunk", "x")) == "AIMessageChunk"
    assert speaker(n8n("function", "x")) == "Function"
    assert speaker(n8n("Human", "x")) == "User"
    assert speaker({"content": "no type"}) == "Unknown"
    assert speaker("not a dict") == "Unknown"
    transcript = build_transcript(rows([n8n("function", "42 results"), n8n("human", "ok")]))
    assert transcript == "Function: 42 results\nUser: ok"


def test_non_dict_messages_are_skipped_without_error():
    messages = rows(["just a string", None, [1, 2], n8n("human", "Real question?")])
    assert build_transcript(messages) == "User: Real question?"
    content = build_content(messages)
    assert content.full_conversation == "User: Real question?"
    assert content.metadata["human_messages"] == 1
    assert message_text(None) == ""
    assert message_text(["a"]) == ""


def test_summary_starts_from_the_user_question_and_is_deterministic():
    messages = rows([n8n(kind, text) for kind, text in SUPPORT_CHAT])
    content = build_content(messages)
    first_user_sentence = "My order 4512 hasn't arrived yet and the tracking page says delivered."
    assert content.summary.startswith(first_user_sentence)
    assert content.summary == build_content(list(reversed(messages))).summary
    assert content.summary == build_content(messages).summary
    assert len(content.summary) <= 400


def test_summary_takes_the_best_sentences_in_original_order():
    texts = [
        "The invoice for March is wrong.",
        "Lunch was nice.",
        "Your March invoice was corrected and a new invoice is attached.",
        "Weather is sunny.",
    ]
    summary = extractive_summary(texts, max_sentences=2)
    assert summary == (
        "The invoice for March is wrong. "
        "Your March invoice was corrected and a new invoice is attached."
    )
    assert extractive_summary(texts, max_sentences=1, lead=None) == texts[2]


def test_summary_is_bounded_and_cut_at_a_word_boundary():
    long_sentence = " ".join(["refund"] * 30 + ["requested", "yesterday"]) + "."
    texts = [long_sentence, long_sentence.replace("refund", "return"), "Refund the return."]
    for max_chars in (20, 57, 100, 400):
        summary = extractive_summary(texts, max_chars=max_chars)
        assert 0 < len(summary) <= max_chars
    cut = extractive_summary(texts, max_chars=57)
    assert cut.endswith("…")
    assert cut[:-1].split(" ")[-1] in {"refund", "return"}  # whole words only
    assert extractive_summary(texts, max_chars=0) == ""
    assert extractive_summary(texts, max_sentences=0) == ""


def test_summary_of_nothing_is_empty():
    assert extractive_summary([]) == ""
    assert extractive_summary(["", "   ", "\n"]) == ""
    assert build_content([]).summary == ""
    assert build_content(rows([n8n("tool", '{"ok": true}')])).summary == ""


def test_cjk_text_is_summarised_and_detected():
    texts = [
        "你好。我的订单还没有到。请帮我查一下订单！",
        "您的订单已经发货了。预计明天到达。",
    ]
    # character bigrams stand in for words, so the sentences about the order (订单) win
    assert extractive_summary(texts, max_sentences=2) == "我的订单还没有到。您的订单已经发货了。"
    assert extractive_summary(texts, max_sentences=2) == extractive_summary(texts, max_sentences=2)
    unspaced = extractive_summary(["注文がまだ届きません" * 60], max_chars=40)
    assert len(unspaced) <= 40 and unspaced.endswith("…")
    content = build_content(rows([n8n("human", texts[0]), n8n("ai", texts[1])]))
    assert content.metadata["language"] == "zh"
    assert guess_language("注文がまだ届きません。確認していただけますか？")[0] == "ja"


def test_sentiment_of_user_messages():
    positive = sentiment(["Thanks, that worked, great!"])
    negative = sentiment(["This is terrible, I hate it"])
    assert positive["compound"] > 0.5 and positive["pos"] > positive["neg"]
    assert negative["compound"] < -0.5 and negative["neg"] > negative["pos"]
    assert set(positive) == {"compound", "pos", "neu", "neg"}
    assert sentiment([]) == {"compound": 0.0, "pos": 0.0, "neu": 1.0, "neg": 0.0}
    assert sentiment(["", "  "]) == {"compound": 0.0, "pos": 0.0, "neu": 1.0, "neg": 0.0}


def test_sentiment_averages_messages_and_only_reads_the_user():
    happy, angry = "Thanks, that worked, great!", "This is terrible, I hate it"
    mixed = sentiment([happy, angry])
    expected = (sentiment([happy])["compound"] + sentiment([angry])["compound"]) / 2
    assert mixed["compound"] == pytest.approx(expected, abs=1e-4)
    # a cheerful assistant does not lift an angry user
    content = build_content(rows([n8n("human", angry), n8n("ai", "Wonderful! Great! Love it!")]))
    assert content.metadata["sentiment"] == sentiment([angry])


def test_sentiment_reads_only_the_last_50_messages():
    texts = ["This is terrible, I hate it"] * 10 + ["Thanks, that worked, great!"] * 50
    assert sentiment(texts) == sentiment(["Thanks, that worked, great!"])


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("Hello, my package has not arrived yet, can you check the delivery status?", "en"),
        ("Bonjour, ma commande n'est toujours pas arrivée, pouvez-vous vérifier ?", "fr"),
        ("Hola, mi pedido todavía no ha llegado, ¿pueden revisar el estado del envío?", "es"),
    ],
)
def test_language_of_clear_sentences(text, code):
    language, confidence = guess_language(text)
    assert language == code
    assert 0.5 < confidence <= 1.0


@pytest.mark.parametrize("text", ["👍", "", "ok", "12345 !!!", "  \n "])
def test_no_language_for_too_few_letters(text):
    assert guess_language(text) == (None, 0.0)


@pytest.mark.parametrize(
    "text",
    [
        "msg 0 ✓ / reply 0",  # was Welsh (or Turkmen) at 0.05-0.07
        "hello",
        "Hi there",
        "Thanks",
        "password reset",  # 13 letters, but the model says Afrikaans at 0.16
        "Hola, necesito ayuda",  # Spanish at 0.46: under the bar
    ],
)
def test_no_language_for_short_or_uncertain_texts(text):
    language, confidence = guess_language(text)
    assert language is None
    assert confidence < LANGUAGE_MIN_CONFIDENCE


def test_language_thresholds():
    assert (LANGUAGE_MIN_LETTERS, LANGUAGE_MIN_CONFIDENCE) == (10, 0.5)
    assert guess_language("ok thanks bye")[0] == "en"  # 11 letters, 0.63
    assert guess_language("Where is my order?")[0] == "en"
    content = build_content(rows([n8n("human", "msg 0 ✓"), n8n("ai", "reply 0")]))
    assert content.metadata["language"] is None


def test_language_comes_from_the_user_not_the_assistant():
    content = build_content(
        rows(
            [
                n8n("human", "Bonjour, je voudrais annuler ma commande s'il vous plaît."),
                n8n("ai", "Sure, I can help you cancel the order right away, no problem."),
            ]
        )
    )
    assert content.metadata["language"] == "fr"
    assert (
        build_content(rows([n8n("ai", "Hello, how can I help you today?")])).metadata["language"]
        is None
    )


@pytest.mark.parametrize("shape", [n8n, langchain])
def test_user_channel_and_handoff_from_additional_kwargs(shape):
    messages = rows(
        [
            shape("system", "You are a helpful agent."),
            shape("human", "Hi", user_id="", channel="   "),  # blank values do not count
            shape("human", "Order?", user_id="cust-17", channel="whatsapp"),
            shape("ai", "Passing you to a human.", handoff=True, user_id="other"),
        ]
    )
    content = build_content(messages)
    assert (content.user_id, content.channel, content.handed_off) == ("cust-17", "whatsapp", True)


def test_integer_user_id_and_no_handoff():
    content = build_content(
        rows([langchain("human", "Hi", user_id=123), n8n("ai", "Hello", handoff="yes")])
    )
    assert content.user_id == "123"
    assert content.channel is None
    assert content.handed_off is False  # only a JSON true counts as a handoff


def test_first_message_by_id_wins_for_user_id():
    messages = [
        SessionMessage(5, n8n("human", "late", user_id="later"), None),
        SessionMessage(2, n8n("human", "early", user_id="earlier", channel="web"), None),
    ]
    content = build_content(messages)
    assert (content.user_id, content.channel) == ("earlier", "web")


def test_nothing_in_kwargs_gives_none():
    content = build_content(rows([n8n("human", "Hi"), {"type": "ai", "additional_kwargs": None}]))
    assert (content.user_id, content.channel, content.handed_off) == (None, None, False)


def test_metadata_counts_and_is_json_serialisable():
    messages = rows(
        [
            langchain("system", "You are a support agent."),
            n8n("human", "Thanks, that worked, great! One more question about billing."),
            n8n("ai", "Of course, what is the billing question?"),
            n8n("tool", '{"invoice": 17, "status": "paid"}'),
            n8n("ai", ""),
            n8n("human", "Is invoice 17 paid?"),
            n8n("ai", "Yes, invoice 17 is paid."),
        ]
    )
    content = build_content(messages)
    assert isinstance(content, ConversationContent)
    metadata = json.loads(json.dumps(content.metadata))
    assert metadata == content.metadata
    assert metadata["message_count"] == 7
    assert metadata["human_messages"] == 2
    assert metadata["ai_messages"] == 3
    assert metadata["system_messages"] == 1
    assert metadata["tool_messages"] == 1
    assert (metadata["first_message_id"], metadata["last_message_id"]) == (1, 7)
    assert metadata["duration_seconds"] == 180.0
    assert metadata["language"] == "en"
    assert 0.0 < metadata["language_confidence"] <= 1.0
    assert metadata["sentiment"]["compound"] > 0
    assert metadata["characters"] == len(content.full_conversation)
    assert metadata["summarizer"] == "extractive"
    assert len(content.full_conversation.splitlines()) == 6  # the empty ai message is left out


def test_duration_needs_both_ends_timed():
    assert (
        build_content(rows([n8n("human", "a"), n8n("ai", "b")], timed=False)).metadata[
            "duration_seconds"
        ]
        is None
    )
    partly = [
        SessionMessage(1, n8n("human", "a"), START),
        SessionMessage(2, n8n("ai", "b"), None),
    ]
    assert build_content(partly).metadata["duration_seconds"] is None
    mixed = [
        SessionMessage(1, n8n("human", "a"), datetime(2026, 1, 1)),
        SessionMessage(2, n8n("ai", "b"), START),
    ]
    assert build_content(mixed).metadata["duration_seconds"] is None


def test_empty_session():
    content = build_content([])
    assert content.full_conversation == ""
    assert content.metadata["message_count"] == 0
    assert content.metadata["first_message_id"] is None
    assert content.metadata["duration_seconds"] is None
    assert content.metadata["language"] is None
    json.dumps(content.metadata)


def test_sentiment_reads_each_message_up_to_a_bound_and_the_newest_first():
    long = "thanks 🙏 but where is my parcel? 注文した商品がまだ届いていません " * 300
    assert sentiment([long]) == sentiment([long[:1000]])
    # 4,000 characters in all, newest first: older messages past it are not read.
    recent = ["I love it, thank you so much!" * 40] * 4  # 1,160 characters each
    assert sentiment(["this is awful and I hate it"] + recent) == sentiment(recent)
