"""The missed-call email's rendering: subject, escaping, time zone, stability across attempts."""

from datetime import datetime, timezone

import pytest

from orchestration.notifications.rendering import (
    MissedCall,
    clean_text,
    display_name,
    format_when,
    recipient_zone,
    render_missed_call,
)

AT = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)


def call(**kw) -> MissedCall:
    base = dict(caller_name="Ana Souza", callee_name="Bruno", call_type="video", outcome="missed", at=AT,
                zone=timezone.utc, app_url="https://app.example.test")
    base.update(kw)
    return MissedCall(**base)


def test_subject_names_the_caller_and_the_kind_of_call():
    assert render_missed_call(call()).subject == "Missed video call from Ana Souza"
    assert render_missed_call(call(call_type="audio")).subject == "Missed audio call from Ana Souza"
    assert render_missed_call(call(caller_name=None)).subject == "Missed video call"


@pytest.mark.parametrize("outcome, phrase", [
    ("missed", "You missed a video call from Ana Souza."),
    ("busy", "while you were on another call"),
    ("cancelled", "hung up before you could answer"),
])
def test_body_says_what_happened(outcome, phrase):
    email = render_missed_call(call(outcome=outcome))
    assert phrase in email.text and phrase in email.html


def test_both_parts_carry_when_and_a_call_back_link():
    email = render_missed_call(call())
    assert "Wednesday, 25 November 2026 at 10:00 (UTC)" in email.text
    assert "Call back: https://app.example.test" in email.text
    assert '<a href="https://app.example.test"' in email.html and ">Call back</a>" in email.html
    assert "Hi Bruno," in email.text and "Hi Bruno," in email.html


def test_html_escapes_a_hostile_display_name():
    hostile = display_name({"full_name": '<script>alert("x")</script> & <img src=x onerror=alert(1)>'})
    email = render_missed_call(call(caller_name=hostile, callee_name="<b>Bruno</b>"))
    assert "<script" not in email.html and "<img" not in email.html and "<b>Bruno" not in email.html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;" in email.html
    assert "&lt;b&gt;Bruno&lt;/b&gt;" in email.html
    # The plain-text part and the subject are not HTML: the name appears as typed.
    assert '<script>alert("x")</script>' in email.text
    assert email.subject.startswith('Missed video call from <script>')


def test_an_app_url_with_quotes_cannot_break_out_of_the_attribute():
    email = render_missed_call(call(app_url='https://x.test/"onmouseover="alert(1)'))
    assert 'href="https://x.test/&quot;onmouseover=&quot;alert(1)"' in email.html


def test_display_names_lose_control_and_bidi_characters_and_are_bounded():
    assert display_name({"full_name": "Ana\r\nBcc: evil@example.com"}) == "Ana Bcc: evil@example.com"
    assert display_name({"full_name": "Ana\u202eazuoS"}) == "AnaazuoS"
    assert display_name({"full_name": "   ", "name": "Ana"}) == "Ana"
    assert display_name({"name": "Ana"}) == "Ana"
    assert display_name({"full_name": 42}) is None
    assert display_name(None) is None and display_name({}) is None
    long = display_name({"full_name": "A" * 500})
    assert len(long) == 80 and long.endswith("…")
    assert clean_text("a\t\tb\x00c") == "a bc"


def test_time_is_shown_in_the_recipients_zone():
    assert format_when(AT, recipient_zone({"timezone": "America/Sao_Paulo"})) == \
        "Wednesday, 25 November 2026 at 07:00 (America/Sao_Paulo)"
    assert format_when(AT, recipient_zone({"timezone": "Asia/Tokyo"})) == \
        "Wednesday, 25 November 2026 at 19:00 (Asia/Tokyo)"


@pytest.mark.parametrize("meta", [{}, {"timezone": "Mars/Olympus"}, {"timezone": "../../etc/passwd"},
                                  {"timezone": 5}, {"timezone": ""}, None])
def test_unknown_or_missing_zone_means_utc(meta):
    assert format_when(AT, recipient_zone(meta)).endswith("at 10:00 (UTC)")


def test_rendering_is_a_pure_function_of_its_input():
    # Every attempt for one outbox row must send the same body (same Idempotency-Key).
    assert render_missed_call(call()) == render_missed_call(call())
