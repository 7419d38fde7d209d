"""A varied prompt set for the tokenizer tests (about 200 prompts).

Each category exercises a place where OpenCLIP's text cleaning (ftfy, HTML
unescaping, Python lower-casing, its own special-token spellings) and
transformers' ``CLIPTokenizer`` can disagree, plus ordinary prompts and
prompts over 77 tokens. Control characters are written as escapes.
"""

PLAIN = [
  "a photo of a cat",
  "a red digit seven on the left",
  "A Handwritten  7, in the top-left corner!",
  "an astronaut riding a horse on the moon, highly detailed, 8k",
  "portrait of an old fisherman, oil painting, dramatic lighting",
  "a bowl of ramen, studio photo, shallow depth of field",
  "cyberpunk city at night, neon signs, rain, reflections",
  "a watercolor painting of a fox in the snow",
  "isometric 3D render of a tiny cozy cabin",
  "the number nine written in yellow, at the bottom",
  "Two dogs playing tug-of-war in a park",
  "a vintage car parked in front of a diner, 1950s",
  "close-up macro shot of a dew drop on a leaf",
  "a minimalist logo of a mountain and the sun",
  "children's book illustration of a bear reading",
]

PUNCTUATION = [
  "it's a cat's toy",
  "hello... world?! (maybe) [or not] {never}",
  "a sign that says 'OPEN 24/7'",
  "price: $19.99 -- 50% off!!!",
  "email me at someone@example.com #art @artist",
  "a~b^c|d\\e/f",
  "we're they've I'll she'd you'RE IT'S",
  "1024x768, f/1.8, ISO-100, 1/250s",
  "https://example.com/image?id=42&size=large",
  "C++ and C# and F*",
  "'single' \"double\" `back`",
  "semi;colon:colon,comma.period",
]

CURLY_QUOTES = [
  "a sign that says \u201cwelcome home\u201d",
  "it\u2019s a dog\u2019s life",
  "\u2018quoted\u2019 words on a poster",
  "the \u201cbest\u201d burger in town, they\u2019re saying",
  "a book titled \u201eDer Zauberberg\u201c",
  "\u00abbonjour\u00bb written on a caf\u00e9 window",
  "don\u2019t stop believin\u2019",
  "a neon sign reading \u201cOPEN\u201d and \u2018CLOSED\u2019",
  "rock \u2019n\u2019 roll guitar",
  "\u2033inches\u2033 and \u2032feet\u2032",
]

HTML_ENTITIES = [
  "salt &amp; pepper",
  "a sign that says &quot;stop&quot;",
  "it&#39;s raining",
  "fish &amp;amp; chips",
  "a &lt;glowing&gt; cube",
  "tom&nbsp;and&nbsp;jerry",
  "caf&eacute; au lait",
  "to be continued&hellip;",
  "&copy; 2024 a copyright notice",
  "black &amp;amp;amp; white photo",
  "the &#8220;old&#8221; bridge",
  "&#x27;hex&#x27; quotes",
  "R&amp;D lab, 5 &gt; 3",
  "&lt;|endoftext|&gt; inside text",
  "an ampersand & alone, and &unknown; entity",
]

WIDTH_FORMS = [
  "\uff21\uff22\uff23 letters in full width",
  "\uff11\uff12\uff13 full-width digits",
  "hello\uff01 full-width exclamation\uff1f",
  "\uff76\uff80\uff76\uff85 half-width katakana",
  "\uff08parentheses\uff09 and \uff3bbrackets\uff3d",
  "\u3000ideographic\u3000space",
  "\uff54\uff45\uff58\uff54 in full-width lower case",
  "a sign with \uff30\uff29\uff3a\uff3a\uff21",
  "\uffe5100 and \uffe1200",
  "full\uff0dwidth\uff0fslash",
]

MIS_ENCODED = [
  "caf\u00c3\u00a9 on the corner",
  "\u00c3\u00bcber cool design",
  "don\u00e2\u20ac\u2122t panic",
  "\u00e2\u20ac\u0153quoted\u00e2\u20ac\u009d text",
  "na\u00c3\u00afve art style",
  "\u00c3\u00a0 la mode",
  "the r\u00c3\u00a9sum\u00c3\u00a9 of a painter",
  "Cr\u00c3\u00a8me br\u00c3\u00bbl\u00c3\u00a9e dessert",
  "a man\u00e2\u20ac\u201cmade lake",
  "pi\u00c3\u00b1ata at a party",
]

LIGATURES = [
  "\ufb01sh in a \ufb02ower pot",
  "o\ufb00ice space",
  "a \ufb01eld of wild\ufb02owers",
  "e\ufb03cient design",
  "ba\ufb04ed by the wa\ufb04e",
  "\ufb06ar\ufb06 in the sky",
  "\u0132ssel river",
  "\u01c6ungla",
]

CONTROL = [
  "a cat\x00 on a mat",
  "bell\x07 tower",
  "tab\tseparated\tprompt",
  "line one\nline two",
  "carriage\r\nreturn",
  "escape \x1b[31mred\x1b[0m text",
  "zero\u200bwidth space",
  "soft\u00adhyphen",
  "form\x0cfeed and vertical\x0btab",
  "delete\x7f char",
  "bidi \u202eoverride\u202c text",
  "bom \ufeffat start",
  "null\x00\x00 bytes",
  "\u2028line separator",
  "non\u00a0breaking space",
]

CJK_AND_SCRIPTS = [
  "\u4e00\u53ea\u732b\u5728\u8349\u5730\u4e0a",
  "\u6771\u4eac\u306e\u591c\u666f\u3001\u30cd\u30aa\u30f3",
  "\ud55c\uad6d\uc5b4 \ubb38\uc7a5 \ud14c\uc2a4\ud2b8",
  "\u0421\u0430\u043d\u043a\u0442-\u041f\u0435\u0442\u0435\u0440\u0431\u0443\u0440\u0433 at dawn",
  "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
  "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
  "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
  "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35 \u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01",
  "emoji party \U0001f389\U0001f431\U0001f680",
  "flag \U0001f1eb\U0001f1f7 and family \U0001f468\u200d\U0001f469\u200d\U0001f467",
  "cafe\u0301 with a combining accent",
  "\u00c5ngstr\u00f6m and \u212bngstr\u00f6m",
  "\u0130stanbul at sunset",
  "STRASSE and Stra\u00dfe and \u1e9e",
  "\u212a kelvin and \u2126 ohm",
]

GREEK = [
  "\u039f\u0394\u039f\u03a3 street sign",
  "\u03a3\u039f\u03a6\u0399\u0391 \u039a\u0391\u0399 \u039b\u039f\u0393\u039f\u03a3",
  "\u0399\u03a3\u03a4\u039f\u03a1\u0399\u0391\u03a3",
  "a \u03a3 symbol alone",
  "\u03b1\u03b2\u03b3 lower case greek",
  "\u0391\u0398\u0397\u039d\u0391 \u039a\u0391\u0399 \u03a3\u03a0\u0391\u03a1\u03a4\u0397",
  "\u039a\u03a5\u03a0\u03a1\u039f\u03a3, the island",
  "OD\u039f\u03a3's end",
]

SPECIAL_TOKENS = [
  "<|endoftext|>",
  "a cat <|endoftext|> and a dog",
  "<|startoftext|> begins here",
  "<start_of_text> a painting",
  "a photo <end_of_text> trailing words",
  "<|ENDOFTEXT|> upper case",
  "<START_OF_TEXT> upper case",
  "<|endoftext|><|endoftext|>",
  "text<|startoftext|>glued",
  "<end_of_text>",
]

CASE_AND_NUMBERS = [
  "A PHOTO OF A CAT IN ALL CAPS",
  "MiXeD CaSe PrOmPt",
  "The Year 2024 In Numbers 1 2 3",
  "3.14159 and 2.71828",
  "100,000 stars",
  "Mr. Smith's 2nd floor apartment",
  "ALL-CAPS-WITH-HYPHENS",
  "Room 101B, Building C-3",
  "v1.0.2-beta release party",
  "x86_64 and ARM64 chips",
]

_LONG_BASE = (
  "a highly detailed matte painting of a sprawling fantasy city built into "
  "the side of a cliff, waterfalls, floating islands, airships, golden hour "
  "light, volumetric fog, intricate architecture, trending on artstation, "
  "by several famous artists, ultra wide angle, 8k resolution"
)
OVER_LENGTH = [
  _LONG_BASE,
  _LONG_BASE + ", " + _LONG_BASE,
  "cat " * 100,
  "\u201cquoted\u201d " * 60,
  "salt &amp; pepper " * 30,
  "\uff21\uff22\uff23 " * 50,
  "\u4e00\u53ea\u732b " * 60,
  "word, " * 80 + "<|endoftext|>",
  "<end_of_text> " * 90,
  ("an extremely long prompt with many commas, " * 12).strip(),
]

# Ordinary prompts with the hazards above mixed in (real prompt sets mix them).
_BASES = PLAIN + CASE_AND_NUMBERS + PUNCTUATION
_HAZARDS = (
  CURLY_QUOTES
  + HTML_ENTITIES
  + WIDTH_FORMS
  + MIS_ENCODED
  + LIGATURES
  + GREEK
  + CONTROL[:6]
)
MIXED = [
  f"{_BASES[k % len(_BASES)]} {extra}" for k, extra in enumerate(_HAZARDS)
]

CATEGORIES = {
  "plain": PLAIN,
  "punctuation": PUNCTUATION,
  "curly quotes": CURLY_QUOTES,
  "HTML entities": HTML_ENTITIES,
  "full/half-width forms": WIDTH_FORMS,
  "mis-encoded text": MIS_ENCODED,
  "ligatures": LIGATURES,
  "control characters": CONTROL,
  "CJK and other scripts": CJK_AND_SCRIPTS,
  "Greek (final sigma)": GREEK,
  "special-token spellings": SPECIAL_TOKENS,
  "case and numbers": CASE_AND_NUMBERS,
  "over 77 tokens": OVER_LENGTH,
  "mixed": MIXED,
}
PROMPTS = [p for group in CATEGORIES.values() for p in group]
