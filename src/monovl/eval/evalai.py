"""EvalAI's VQA answer normalisation, as VLMEvalKit applies it (`process_answer`): the official tables.

Steps: newlines and tabs become spaces, the text is stripped; punctuation (`punctuation`); lower case, number
words up to ten become digits, articles go; contractions written without apostrophes get them back.
"""
from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_THOUSANDS_COMMA = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period with no digit on either side
# VLMEvalKit passes re.UNICODE (32) where `Pattern.sub` takes `count`: at most 32 periods are removed.
_PERIOD_LIMIT = 32
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# The EvalAI table exactly, odd entries included ("somebody'd" maps to "somebodyd"). Words are looked up after
# lower-casing, so the capitalised keys (Im, Ive, Id've, I'dve) never match, as in VLMEvalKit.
_CONTRACTION_ROWS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd
howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've
it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've
mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't|notve not've
oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't
shed've she'd've|she'dve she'd've|she's she's|shouldve should've|shouldnt shouldn't
shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|somebodyd've somebody'd've
somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've
somethingll something'll|thats that's|thered there'd|thered've there'd've|there'dve there'd've
therere there're|theres there's|theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll
theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've
werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's|whered where'd
wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS = dict(pair.split(" ") for pair in _CONTRACTION_ROWS.replace("\n", "|").split("|") if pair)


def punctuation(text: str) -> str:
    """Each punctuation mark is deleted where it touches a space somewhere in the text (or the text has a
    thousands comma such as 1,000), else replaced by a space; then periods not next to a digit go."""
    out = text
    strip_all = _THOUSANDS_COMMA.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if strip_all or p + " " in text or " " + p in text else " ")
    return _LONE_PERIOD.sub("", out, count=_PERIOD_LIMIT)


def digits_and_articles(text: str) -> str:
    """Lower case; number words -> digits; articles dropped; contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_vqa(text: str) -> str:
    """An answer as EvalAI (and VLMEvalKit's VQA scorers) compare it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return digits_and_articles(punctuation(text))
