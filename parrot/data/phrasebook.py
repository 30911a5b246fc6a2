"""How the synthetic world is said in six languages (en, zh, pt, ar, tr, ru).

Each `Phrasebook` turns a semantic `Question` (kind + referents) into a natural question, renders answer values
(colour words agreeing with their noun, number words agreeing with the counted noun, ...) and writes captions.
Grammar is explicit lexicon tables rather than morphology rules: Portuguese gender/number agreement, Russian
paucal counting (два красных круга / две красные звезды), Arabic dual and number-gender polarity with
non-human plurals agreeing in the feminine singular, Turkish bare nouns after numerals, Chinese measure words.

Phrasings are chosen by an integer `variant` (taken modulo the number of phrasings), so callers own randomness.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = ("white", "black", "gray", "brown")
SIZES = ("large", "small")
POSITIONS = ("left", "right", "top", "bottom", "center")
LANGUAGES = ("en", "zh", "pt", "ar", "tr", "ru")

# Agreement targets besides the shapes themselves: the generic "figure/shape" noun and the background noun.
FIGURE = "figure"
BACKGROUND = "background"


@dataclass(frozen=True)
class Question:
    """A language-independent question about a scene. `shape`/`colour`/`position` are its referents."""

    kind: str
    shape: str | None = None
    colour: str | None = None
    position: str | None = None
    plural: bool = False  # the referenced shape occurs more than once


def _pick(options: tuple[str, ...], variant: int) -> str:
    return options[variant % len(options)]


def _join(items: list[str], comma: str, last: str) -> str:
    if len(items) == 1:
        return items[0]
    return comma.join(items[:-1]) + last + items[-1]


class Phrasebook:
    """Interface; one subclass per language."""

    lang: str
    caption_prompts: tuple[str, ...]

    def capitalize(self, text: str) -> str:
        return text[:1].upper() + text[1:]

    def caption(self, scene, variant: int) -> str:  # scene: synthetic.Scene
        raise NotImplementedError

    def question(self, q: Question, variant: int) -> str:
        raise NotImplementedError

    # answer values --------------------------------------------------------------------------------------
    def colour_word(self, colour: str, noun: str | None, plural: bool = False) -> str:
        """`colour` as an answer about `noun` (a shape, FIGURE, BACKGROUND, or None for the citation form)."""
        raise NotImplementedError

    def shape_word(self, shape: str) -> str:
        raise NotImplementedError

    def count_word(self, n: int, noun: str) -> str:
        raise NotImplementedError

    def position_word(self, position: str) -> str:
        raise NotImplementedError

    def size_word(self, size: str, noun: str, plural: bool = False) -> str:
        raise NotImplementedError

    def description(self, shape: str, colour: str, size: str) -> str:
        """Indefinite singular noun phrase, e.g. 'a large red circle'."""
        raise NotImplementedError

    def yes_no(self, value: bool) -> str:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ English
class English(Phrasebook):
    lang = "en"
    caption_prompts = (
        "Describe the image briefly.",
        "What is in this picture?",
        "Give a short description of the image.",
        "Write a short caption for this image.",
    )
    plural = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
              "cross": "crosses", "diamond": "diamonds"}
    numbers = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    positions = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "center": "in the center"}

    @staticmethod
    def _a(word: str) -> str:
        return ("an " if word[0] in "aeiou" else "a ") + word

    def group_phrase(self, group, with_position: bool) -> str:
        if group.count == 1:
            phrase = self._a(f"{group.size} {group.colour} {group.shape}")
            return f"{phrase} {self.positions[group.positions[0]]}" if with_position else phrase
        return f"{self.numbers[group.count]} {group.size} {group.colour} {self.plural[group.shape]}"

    def caption(self, scene, variant: int) -> str:
        items = _join([self.group_phrase(g, True) for g in scene.groups], ", ", " and ")
        templates = ("{items} against a {bg} background.", "The image shows {items} against a {bg} background.",
                     "A {bg} background with {items}.")
        return self.capitalize(_pick(templates, variant).format(items=items, bg=scene.background))

    def question(self, q: Question, variant: int) -> str:
        s, c = q.shape, q.colour
        sp = self.plural.get(s, "")
        pos = self.positions.get(q.position, "")
        t = {
            "colour": (f"What colour are the {sp}?", f"What is the colour of the {sp}?") if q.plural
            else (f"What colour is the {s}?", f"What is the colour of the {s}?", f"Which colour is the {s}?"),
            "shape": (f"What shape is the {c} object?", f"Which shape is {c}?", f"What is the {c} shape?"),
            "count": (f"How many {sp} are there?", f"How many {sp} can you see?",
                      f"How many {sp} are in the image?"),
            "position": (f"Where is the {s}?", f"Where is the {s} located?",
                         f"In which part of the image is the {s}?"),
            "background": ("What colour is the background?", "What is the background colour?"),
            "shape_at_position": (f"What shape is {pos}?", f"Which shape can be seen {pos}?"),
            "colour_at_position": (f"What colour is the shape {pos}?", f"What is the colour of the object {pos}?"),
            "most_frequent_shape": ("Which shape appears most often?", "Which shape is the most numerous?"),
            "total_count": ("How many shapes are there in total?", "How many objects are in the image?"),
            "colour_presence": ("Which of these colours appears in the image?",),
            "shape_presence": ("Which of these shapes appears in the image?",),
            "shape_absence": ("Which of these shapes is not in the image?",),
            "colour_count": (f"How many {c} shapes are there?", f"How many {c} objects are in the image?"),
            "attribute_binding": ("Which of the following is in the image?",),
            "largest_shape": ("Which shape is the largest?", "Which shape is bigger than the others?"),
            "size": (f"Are the {sp} large or small?",) if q.plural
            else (f"Is the {s} large or small?", f"How big is the {s}?"),
            "exists": (f"Is there {self._a(f'{c} {s}')} in the image?",),
        }[q.kind]
        return _pick(t, variant)

    def colour_word(self, colour, noun, plural=False):
        return colour

    def shape_word(self, shape):
        return shape

    def count_word(self, n, noun):
        return self.numbers[n]

    def position_word(self, position):
        return self.positions[position]

    def size_word(self, size, noun, plural=False):
        return size

    def description(self, shape, colour, size):
        return self._a(f"{size} {colour} {shape}")

    def yes_no(self, value):
        return "yes" if value else "no"


# ------------------------------------------------------------------------------------------------ Chinese
class Chinese(Phrasebook):
    lang = "zh"
    caption_prompts = ("简要描述这张图片。", "图片里有什么？", "请为这张图片写一句简短的说明。", "用一句话描述这张图片。")
    shapes = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "cross": "十字形",
              "diamond": "菱形"}
    colours = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色",
               "white": "白色", "black": "黑色", "gray": "灰色", "brown": "棕色"}
    sizes = {"large": "大", "small": "小"}
    positions = {"left": "左边", "right": "右边", "top": "上方", "bottom": "下方", "center": "中间"}
    numbers = {1: "一", 2: "两", 3: "三", 4: "四", 5: "五"}

    def group_phrase(self, group) -> str:
        return f"{self.numbers[group.count]}个{self.colours[group.colour]}的{self.sizes[group.size]}{self.shapes[group.shape]}"

    def caption(self, scene, variant: int) -> str:
        clauses = [
            f"{self.positions[g.positions[0]]}有{self.group_phrase(g)}" if g.count == 1 else f"有{self.group_phrase(g)}"
            for g in scene.groups
        ]
        bg = self.colours[scene.background]
        templates = ("在{bg}背景上，{c}。", "这张图片的背景是{bg}，{c}。", "图中是{bg}的背景，{c}。")
        return _pick(templates, variant).format(bg=bg, c="，".join(clauses))

    def question(self, q: Question, variant: int) -> str:
        s = self.shapes.get(q.shape, "")
        c = self.colours.get(q.colour, "")
        pos = self.positions.get(q.position, "")
        t = {
            "colour": (f"{s}是什么颜色的？", f"图中的{s}是什么颜色？"),
            "shape": (f"{c}的图形是什么形状？", f"哪个图形是{c}的？"),
            "count": (f"图中有几个{s}？", f"一共有多少个{s}？"),
            "position": (f"{s}在哪里？", f"{s}位于图片的什么位置？"),
            "background": ("背景是什么颜色？", "图片的背景是什么颜色的？"),
            "shape_at_position": (f"{pos}是什么形状？", f"{pos}的图形是什么形状？"),
            "colour_at_position": (f"{pos}的图形是什么颜色？", f"{pos}那个图形是什么颜色的？"),
            "most_frequent_shape": ("哪种图形数量最多？", "图中哪种形状出现得最多？"),
            "total_count": ("图中一共有几个图形？", "图片里总共有多少个图形？"),
            "colour_presence": ("下列哪种颜色出现在图中？",),
            "shape_presence": ("下列哪种形状出现在图中？",),
            "shape_absence": ("下列哪种形状没有出现在图中？",),
            "colour_count": (f"图中有几个{c}的图形？", f"{c}的图形有多少个？"),
            "attribute_binding": ("下列哪一项出现在图中？",),
            "largest_shape": ("哪个图形最大？", "哪种图形的尺寸最大？"),
            "size": (f"{s}是大的还是小的？",),
            "exists": (f"图中有{c}的{s}吗？",),
        }[q.kind]
        return _pick(t, variant)

    def colour_word(self, colour, noun, plural=False):
        return self.colours[colour]

    def shape_word(self, shape):
        return self.shapes[shape]

    def count_word(self, n, noun):
        return f"{self.numbers[n]}个"

    def position_word(self, position):
        return self.positions[position]

    def size_word(self, size, noun, plural=False):
        return f"{self.sizes[size]}的"

    def description(self, shape, colour, size):
        return f"一个{self.colours[colour]}的{self.sizes[size]}{self.shapes[shape]}"

    def yes_no(self, value):
        return "有" if value else "没有"


# --------------------------------------------------------------------------------------------- Portuguese
class Portuguese(Phrasebook):
    lang = "pt"
    caption_prompts = (
        "Descreva a imagem brevemente.",
        "O que há nesta imagem?",
        "Escreva uma legenda curta para esta imagem.",
        "Faça uma breve descrição da imagem.",
    )
    # noun: (singular, plural, gender)
    shapes = {"circle": ("círculo", "círculos", "m"), "square": ("quadrado", "quadrados", "m"),
              "triangle": ("triângulo", "triângulos", "m"), "star": ("estrela", "estrelas", "f"),
              "cross": ("cruz", "cruzes", "f"), "diamond": ("losango", "losangos", "m"),
              FIGURE: ("figura", "figuras", "f"), BACKGROUND: ("fundo", "fundos", "m")}
    # adjective: (m sg, f sg, m pl, f pl)
    adjectives = {
        "red": ("vermelho", "vermelha", "vermelhos", "vermelhas"), "green": ("verde", "verde", "verdes", "verdes"),
        "blue": ("azul", "azul", "azuis", "azuis"), "yellow": ("amarelo", "amarela", "amarelos", "amarelas"),
        "purple": ("roxo", "roxa", "roxos", "roxas"), "orange": ("laranja", "laranja", "laranja", "laranja"),
        "white": ("branco", "branca", "brancos", "brancas"), "black": ("preto", "preta", "pretos", "pretas"),
        "gray": ("cinza", "cinza", "cinza", "cinza"), "brown": ("marrom", "marrom", "marrons", "marrons"),
        "large": ("grande", "grande", "grandes", "grandes"),
        "small": ("pequeno", "pequena", "pequenos", "pequenas"),
    }
    positions = {"left": "à esquerda", "right": "à direita", "top": "em cima", "bottom": "embaixo",
                 "center": "no centro"}
    numbers = {1: ("um", "uma"), 2: ("dois", "duas"), 3: ("três", "três"), 4: ("quatro", "quatro"),
               5: ("cinco", "cinco")}

    def _adj(self, word: str, noun: str, plural: bool) -> str:
        return self.adjectives[word][(2 if plural else 0) + (self.shapes[noun][2] == "f")]

    def _article(self, noun: str, plural: bool = False, definite: bool = True) -> str:
        fem = self.shapes[noun][2] == "f"
        if definite:
            return ("as" if fem else "os") if plural else ("a" if fem else "o")
        return "uma" if fem else "um"

    def group_phrase(self, group, with_position: bool) -> str:
        sg, pl, gender = self.shapes[group.shape]
        plural = group.count > 1
        noun = pl if plural else sg
        number = self.numbers[group.count][gender == "f"]
        phrase = (f"{number} {noun} {self._adj(group.colour, group.shape, plural)} "
                  f"{self._adj(group.size, group.shape, plural)}")
        if with_position and group.count == 1:
            phrase += " " + self.positions[group.positions[0]]
        return phrase

    def caption(self, scene, variant: int) -> str:
        items = _join([self.group_phrase(g, True) for g in scene.groups], ", ", " e ")
        bg = self._adj(scene.background, BACKGROUND, False)
        templates = ("{items} sobre um fundo {bg}.", "A imagem mostra {items} sobre um fundo {bg}.",
                     "Um fundo {bg} com {items}.")
        return self.capitalize(_pick(templates, variant).format(items=items, bg=bg))

    def question(self, q: Question, variant: int) -> str:
        s = q.shape
        sg, pl, gender = self.shapes[s] if s else ("", "", "m")
        fem = gender == "f"
        art = self._article(s, q.plural) if s else ""
        de = {"o": "do", "a": "da", "os": "dos", "as": "das"}.get(art, "")
        noun = pl if q.plural else sg
        colour_f = self._adj(q.colour, FIGURE, False) if q.colour else ""
        colour_fpl = self._adj(q.colour, FIGURE, True) if q.colour else ""
        pos = self.positions.get(q.position, "")
        quantos = "Quantas" if fem else "Quantos"
        t = {
            "colour": (f"De que cor são {art} {noun}?", f"Qual é a cor {de} {noun}?") if q.plural
            else (f"De que cor é {art} {noun}?", f"Qual é a cor {de} {noun}?"),
            "shape": (f"Qual é a forma da figura {colour_f}?", f"Que forma tem a figura {colour_f}?"),
            "count": (f"{quantos} {pl} há na imagem?", f"{quantos} {pl} aparecem na imagem?"),
            "position": (f"Onde está {art} {noun}?", f"Em que parte da imagem está {art} {noun}?"),
            "background": ("De que cor é o fundo?", "Qual é a cor do fundo?"),
            "shape_at_position": (f"Que forma está {pos}?", f"Qual figura aparece {pos}?"),
            "colour_at_position": (f"De que cor é a figura {pos}?", f"Qual é a cor da figura {pos}?"),
            "most_frequent_shape": ("Qual forma aparece mais vezes?", "Qual é a forma mais frequente na imagem?"),
            "total_count": ("Quantas figuras há na imagem ao todo?", "Quantas figuras aparecem na imagem?"),
            "colour_presence": ("Qual destas cores aparece na imagem?",),
            "shape_presence": ("Qual destas formas aparece na imagem?",),
            "shape_absence": ("Qual destas formas não aparece na imagem?",),
            "colour_count": (f"Quantas figuras {colour_fpl} há na imagem?",),
            "attribute_binding": ("Qual das opções abaixo aparece na imagem?",),
            "largest_shape": ("Qual forma é a maior?", "Qual figura é maior que as outras?"),
            "size": (self.capitalize(f"{art} {noun} {'são' if q.plural else 'é'} "
                                     f"{self._adj('large', s, q.plural)} ou {self._adj('small', s, q.plural)}?"),)
            if s else ("",),
            "exists": (f"Há {self._article(s, definite=False)} {sg} {self._adj(q.colour, s, False)} na imagem?",)
            if s and q.colour else ("",),
        }[q.kind]
        return _pick(t, variant)

    def colour_word(self, colour, noun, plural=False):
        return self.adjectives[colour][0] if noun is None else self._adj(colour, noun, plural)

    def shape_word(self, shape):
        return self.shapes[shape][0]

    def count_word(self, n, noun):
        return self.numbers[n][self.shapes[noun][2] == "f"]

    def position_word(self, position):
        return self.positions[position]

    def size_word(self, size, noun, plural=False):
        return self._adj(size, noun, plural)

    def description(self, shape, colour, size):
        return (f"{self._article(shape, definite=False)} {self.shapes[shape][0]} "
                f"{self._adj(colour, shape, False)} {self._adj(size, shape, False)}")

    def yes_no(self, value):
        return "sim" if value else "não"


# ------------------------------------------------------------------------------------------------- Arabic
class Arabic(Phrasebook):
    lang = "ar"
    caption_prompts = ("صف الصورة باختصار.", "ماذا يوجد في هذه الصورة؟", "اكتب وصفًا قصيرًا لهذه الصورة.",
                       "صف محتوى الصورة في جملة واحدة.")
    # noun: (indefinite sg, accusative sg after كم, dual, plural, definite plural, gender)
    shapes = {
        "circle": ("دائرة", "دائرة", "دائرتان", "دوائر", "الدوائر", "f"),
        "square": ("مربع", "مربعًا", "مربعان", "مربعات", "المربعات", "m"),
        "triangle": ("مثلث", "مثلثًا", "مثلثان", "مثلثات", "المثلثات", "m"),
        "star": ("نجمة", "نجمة", "نجمتان", "نجوم", "النجوم", "f"),
        "cross": ("صليب", "صليبًا", "صليبان", "صلبان", "الصلبان", "m"),
        "diamond": ("معين", "معينًا", "معينان", "معينات", "المعينات", "m"),
        FIGURE: ("شكل", "شكلًا", "شكلان", "أشكال", "الأشكال", "m"),
        BACKGROUND: ("خلفية", "خلفية", "خلفيتان", "خلفيات", "الخلفيات", "f"),
    }
    # adjective: (m sg, f sg, m dual, f dual); non-human plurals take the feminine singular.
    adjectives = {
        "red": ("أحمر", "حمراء", "أحمران", "حمراوان"), "green": ("أخضر", "خضراء", "أخضران", "خضراوان"),
        "blue": ("أزرق", "زرقاء", "أزرقان", "زرقاوان"), "yellow": ("أصفر", "صفراء", "أصفران", "صفراوان"),
        "purple": ("بنفسجي", "بنفسجية", "بنفسجيان", "بنفسجيتان"),
        "orange": ("برتقالي", "برتقالية", "برتقاليان", "برتقاليتان"),
        "white": ("أبيض", "بيضاء", "أبيضان", "بيضاوان"), "black": ("أسود", "سوداء", "أسودان", "سوداوان"),
        "gray": ("رمادي", "رمادية", "رماديان", "رماديتان"), "brown": ("بني", "بنية", "بنيان", "بنيتان"),
        "large": ("كبير", "كبيرة", "كبيران", "كبيرتان"), "small": ("صغير", "صغيرة", "صغيران", "صغيرتان"),
    }
    positions = {"left": "على اليسار", "right": "على اليمين", "top": "في الأعلى", "bottom": "في الأسفل",
                 "center": "في المنتصف"}
    # number words by the gender of the counted noun: 1-2 agree, 3-10 take the opposite gender form.
    numbers = {1: ("واحد", "واحدة"), 2: ("اثنان", "اثنتان"), 3: ("ثلاثة", "ثلاث"), 4: ("أربعة", "أربع"),
               5: ("خمسة", "خمس")}

    def _fem(self, noun: str) -> bool:
        return self.shapes[noun][5] == "f"

    def _adj(self, word: str, noun: str, count: int) -> str:
        forms = self.adjectives[word]
        if count == 2:
            return forms[3 if self._fem(noun) else 2]
        if count > 2:
            return forms[1]
        return forms[1 if self._fem(noun) else 0]

    def _definite(self, noun: str) -> str:
        return "ال" + self.shapes[noun][0]

    def group_phrase(self, group, with_position: bool) -> str:
        sg, _, dual, pl, _, _ = self.shapes[group.shape]
        n = group.count
        adjs = f"{self._adj(group.colour, group.shape, n)} {self._adj(group.size, group.shape, n)}"
        if n == 1:
            phrase = f"{sg} {adjs}"
            return f"{phrase} {self.positions[group.positions[0]]}" if with_position else phrase
        if n == 2:
            return f"{dual} {adjs}"
        return f"{self.numbers[n][self._fem(group.shape)]} {pl} {adjs}"

    def caption(self, scene, variant: int) -> str:
        items = _join([self.group_phrase(g, True) for g in scene.groups], "، ", " و")
        bg = self._adj(scene.background, BACKGROUND, 1)
        templates = ("{items} على خلفية {bg}.", "صورة فيها {items} على خلفية {bg}.", "على خلفية {bg} يوجد {items}.")
        return _pick(templates, variant).format(items=items, bg=bg)

    def question(self, q: Question, variant: int) -> str:
        s = q.shape
        definite = (self.shapes[s][4] if q.plural else self._definite(s)) if s else ""
        fem = self._fem(s) if s else False
        colour_def = "ال" + self.adjectives[q.colour][0] if q.colour else ""
        colour_m = self.adjectives[q.colour][0] if q.colour else ""
        # accusative of the tamyiz after كم: nisba adjectives take tanwin (برتقاليًا), diptotes (أحمر) do not
        colour_acc = colour_m + "ًا" if colour_m.endswith("ي") else colour_m
        pos = self.positions.get(q.position, "")
        size_adjs = (f"{self._adj('large', s, 3 if q.plural else 1)} أم {self._adj('small', s, 3 if q.plural else 1)}"
                     if s else "")
        t = {
            "colour": (f"ما لون {definite}؟", f"ما هو لون {definite}؟"),
            "shape": (f"ما هو الشكل {colour_def}؟", f"أي شكل لونه {colour_m}؟"),
            "count": (f"كم {self.shapes[s][1]} في الصورة؟", f"كم عدد {self.shapes[s][4]} في الصورة؟") if s else ("",),
            "position": (f"أين {'تقع' if fem else 'يقع'} {definite}؟", f"في أي جزء من الصورة {'توجد' if fem else 'يوجد'} {definite}؟"),
            "background": ("ما لون الخلفية؟", "ما هو لون خلفية الصورة؟"),
            "shape_at_position": (f"ما الشكل الموجود {pos}؟", f"أي شكل يظهر {pos}؟"),
            "colour_at_position": (f"ما لون الشكل الموجود {pos}؟", f"ما لون الشكل الذي {pos}؟"),
            "most_frequent_shape": ("أي شكل يظهر أكثر من غيره؟", "ما الشكل الأكثر تكرارًا في الصورة؟"),
            "total_count": ("كم شكلًا في الصورة إجمالًا؟", "كم عدد الأشكال في الصورة؟"),
            "colour_presence": ("أي من هذه الألوان يظهر في الصورة؟",),
            "shape_presence": ("أي من هذه الأشكال يظهر في الصورة؟",),
            "shape_absence": ("أي من هذه الأشكال لا يظهر في الصورة؟",),
            "colour_count": (f"كم شكلًا {colour_acc} في الصورة؟",),
            "attribute_binding": ("أي مما يلي يظهر في الصورة؟",),
            "largest_shape": ("ما هو الشكل الأكبر؟", "أي شكل هو الأكبر حجمًا؟"),
            "size": (f"هل {definite} {size_adjs}؟",),
            "exists": (f"هل {'توجد' if fem else 'يوجد'} {self.shapes[s][0]} {self._adj(q.colour, s, 1)} في الصورة؟",)
            if s and q.colour else ("",),
        }[q.kind]
        return _pick(t, variant)

    def colour_word(self, colour, noun, plural=False):
        # Arabic answers name the colour itself ("أحمر"), the masculine form, whatever the noun.
        return self.adjectives[colour][0]

    def shape_word(self, shape):
        return self.shapes[shape][0]

    def count_word(self, n, noun):
        return self.numbers[n][self._fem(noun)]

    def position_word(self, position):
        return self.positions[position]

    def size_word(self, size, noun, plural=False):
        return self._adj(size, noun, 3 if plural else 1)

    def description(self, shape, colour, size):
        return f"{self.shapes[shape][0]} {self._adj(colour, shape, 1)} {self._adj(size, shape, 1)}"

    def yes_no(self, value):
        return "نعم" if value else "لا"


# ------------------------------------------------------------------------------------------------ Turkish
class Turkish(Phrasebook):
    lang = "tr"
    caption_prompts = ("Resmi kısaca açıkla.", "Bu resimde ne var?", "Bu görsel için kısa bir açıklama yaz.",
                       "Resmi bir cümleyle anlat.")
    # noun: (nominative, genitive, plural)
    shapes = {"circle": ("daire", "dairenin", "daireler"), "square": ("kare", "karenin", "kareler"),
              "triangle": ("üçgen", "üçgenin", "üçgenler"), "star": ("yıldız", "yıldızın", "yıldızlar"),
              "cross": ("artı", "artının", "artılar"),
              "diamond": ("eşkenar dörtgen", "eşkenar dörtgenin", "eşkenar dörtgenler")}
    colours = {"red": "kırmızı", "green": "yeşil", "blue": "mavi", "yellow": "sarı", "purple": "mor",
               "orange": "turuncu", "white": "beyaz", "black": "siyah", "gray": "gri", "brown": "kahverengi"}
    sizes = {"large": "büyük", "small": "küçük"}
    positions = {"left": "solda", "right": "sağda", "top": "üstte", "bottom": "altta", "center": "ortada"}
    numbers = {1: "bir", 2: "iki", 3: "üç", 4: "dört", 5: "beş"}

    def capitalize(self, text: str) -> str:
        # Turkish dotted/dotless i: i -> İ, ı -> I.
        head = {"i": "İ", "ı": "I"}.get(text[:1], text[:1].upper())
        return head + text[1:]

    def group_phrase(self, group, with_position: bool) -> str:
        size, colour, noun = self.sizes[group.size], self.colours[group.colour], self.shapes[group.shape][0]
        if group.count == 1:
            phrase = f"{size} {colour} bir {noun}"
            return f"{self.positions[group.positions[0]]} {phrase}" if with_position else phrase
        return f"{self.numbers[group.count]} {size} {colour} {noun}"  # no plural suffix after a numeral

    def caption(self, scene, variant: int) -> str:
        items = _join([self.group_phrase(g, True) for g in scene.groups], ", ", " ve ")
        bg = self.colours[scene.background]
        templates = ("{bg} arka plan üzerinde {items}.", "Resimde {bg} bir arka plan üzerinde {items} var.",
                     "{bg} zemin üzerinde {items} görülüyor.")
        return self.capitalize(_pick(templates, variant).format(items=items, bg=bg))

    def question(self, q: Question, variant: int) -> str:
        nom, gen, pl = self.shapes[q.shape] if q.shape else ("", "", "")
        pl_gen = pl + ("in" if pl.endswith("ler") else "ın")
        c = self.colours.get(q.colour, "")
        pos = self.positions.get(q.position, "")
        pos_adj = pos + "ki"  # solda -> soldaki
        cap = self.capitalize
        t = {
            "colour": (cap(f"{pl} ne renk?"), cap(f"{pl_gen} rengi ne?")) if q.plural
            else (cap(f"{nom} ne renk?"), cap(f"{gen} rengi ne?")),
            "shape": (cap(f"{c} şekil hangisi?"), cap(f"{c} olan şekil nedir?")),
            "count": (f"Resimde kaç {nom} var?", f"Resimde kaç tane {nom} görülüyor?"),
            "position": (cap(f"{nom} nerede?"), cap(f"{nom} resmin neresinde?")),
            "background": ("Arka plan ne renk?", "Arka planın rengi ne?"),
            "shape_at_position": (cap(f"{pos} hangi şekil var?"), cap(f"{pos_adj} şekil nedir?")),
            "colour_at_position": (cap(f"{pos_adj} şekil ne renk?"), cap(f"{pos_adj} şeklin rengi ne?")),
            "most_frequent_shape": ("Hangi şekil en çok görünüyor?", "Resimde en çok hangi şekil var?"),
            "total_count": ("Resimde toplam kaç şekil var?", "Görselde kaç şekil bulunuyor?"),
            "colour_presence": ("Bu renklerden hangisi resimde var?",),
            "shape_presence": ("Bu şekillerden hangisi resimde var?",),
            "shape_absence": ("Bu şekillerden hangisi resimde yok?",),
            "colour_count": (f"Resimde kaç {c} şekil var?", f"Kaç tane {c} şekil görülüyor?"),
            "attribute_binding": ("Aşağıdakilerden hangisi resimde var?",),
            "largest_shape": ("En büyük şekil hangisi?", "Hangi şekil diğerlerinden daha büyük?"),
            "size": (cap(f"{pl if q.plural else nom} büyük mü küçük mü?"),),
            "exists": (f"Resimde {c} bir {nom} var mı?",),
        }[q.kind]
        return _pick(t, variant)

    def colour_word(self, colour, noun, plural=False):
        return self.colours[colour]

    def shape_word(self, shape):
        return self.shapes[shape][0]

    def count_word(self, n, noun):
        return self.numbers[n]

    def position_word(self, position):
        return self.positions[position]

    def size_word(self, size, noun, plural=False):
        return self.sizes[size]

    def description(self, shape, colour, size):
        return f"{self.sizes[size]} {self.colours[colour]} bir {self.shapes[shape][0]}"

    def yes_no(self, value):
        return "evet" if value else "hayır"


# ------------------------------------------------------------------------------------------------ Russian
class Russian(Phrasebook):
    lang = "ru"
    caption_prompts = ("Кратко опишите изображение.", "Что изображено на этой картинке?",
                       "Напишите короткую подпись к этому изображению.", "Опишите картинку одним предложением.")
    # noun: (nom sg, gen sg, nom pl, gen pl, gender)
    shapes = {"circle": ("круг", "круга", "круги", "кругов", "m"),
              "square": ("квадрат", "квадрата", "квадраты", "квадратов", "m"),
              "triangle": ("треугольник", "треугольника", "треугольники", "треугольников", "m"),
              "star": ("звезда", "звезды", "звёзды", "звёзд", "f"),
              "cross": ("крест", "креста", "кресты", "крестов", "m"),
              "diamond": ("ромб", "ромба", "ромбы", "ромбов", "m"),
              FIGURE: ("фигура", "фигуры", "фигуры", "фигур", "f"),
              BACKGROUND: ("фон", "фона", "фоны", "фонов", "m")}
    # adjective: (nom m sg, nom f sg, nom pl, gen pl, prepositional m sg)
    adjectives = {
        "red": ("красный", "красная", "красные", "красных", "красном"),
        "green": ("зелёный", "зелёная", "зелёные", "зелёных", "зелёном"),
        "blue": ("синий", "синяя", "синие", "синих", "синем"),
        "yellow": ("жёлтый", "жёлтая", "жёлтые", "жёлтых", "жёлтом"),
        "purple": ("фиолетовый", "фиолетовая", "фиолетовые", "фиолетовых", "фиолетовом"),
        "orange": ("оранжевый", "оранжевая", "оранжевые", "оранжевых", "оранжевом"),
        "white": ("белый", "белая", "белые", "белых", "белом"),
        "black": ("чёрный", "чёрная", "чёрные", "чёрных", "чёрном"),
        "gray": ("серый", "серая", "серые", "серых", "сером"),
        "brown": ("коричневый", "коричневая", "коричневые", "коричневых", "коричневом"),
        "large": ("большой", "большая", "большие", "больших", "большом"),
        "small": ("маленький", "маленькая", "маленькие", "маленьких", "маленьком"),
    }
    positions = {"left": "слева", "right": "справа", "top": "сверху", "bottom": "снизу", "center": "в центре"}
    numbers = {1: ("один", "одна"), 2: ("два", "две"), 3: ("три", "три"), 4: ("четыре", "четыре"),
               5: ("пять", "пять")}

    def _fem(self, noun: str) -> bool:
        return self.shapes[noun][4] == "f"

    def _adj(self, word: str, noun: str, plural: bool = False) -> str:
        forms = self.adjectives[word]
        return forms[2] if plural else forms[1 if self._fem(noun) else 0]

    def group_phrase(self, group, with_position: bool) -> str:
        nom, gen, _, _, _ = self.shapes[group.shape]
        if group.count == 1:
            phrase = f"{self._adj(group.size, group.shape)} {self._adj(group.colour, group.shape)} {nom}"
            return f"{phrase} {self.positions[group.positions[0]]}" if with_position else phrase
        # 2-4: genitive singular noun; adjectives genitive plural (masculine) or nominative plural (feminine).
        # 5+ would need the genitive plural noun, but a group holds at most 4 objects.
        adj_case = 2 if self._fem(group.shape) else 3
        size, colour = self.adjectives[group.size][adj_case], self.adjectives[group.colour][adj_case]
        return f"{self.numbers[group.count][self._fem(group.shape)]} {size} {colour} {gen}"

    def caption(self, scene, variant: int) -> str:
        items = _join([self.group_phrase(g, True) for g in scene.groups], ", ", " и ")
        bg = self.adjectives[scene.background][4]
        templates = ("{items} на {bg} фоне.", "На картинке {items} на {bg} фоне.", "На {bg} фоне изображены {items}.")
        return self.capitalize(_pick(templates, variant).format(items=items, bg=bg))

    def question(self, q: Question, variant: int) -> str:
        nom, gen, nom_pl, gen_pl, _ = self.shapes[q.shape] if q.shape else ("", "", "", "", "m")
        c = q.colour
        pos = self.positions.get(q.position, "")
        cap = self.capitalize
        t = {
            "colour": (f"Какого цвета {nom_pl}?", f"Какой цвет у {gen_pl}?") if q.plural
            else (f"Какого цвета {nom}?", f"Какой цвет у {gen}?"),
            "shape": (f"Какая фигура {self._adj(c, FIGURE)}?", f"Какой формы {self._adj(c, FIGURE)} фигура?")
            if c else ("",),
            "count": (f"Сколько {gen_pl} на картинке?", f"Сколько {gen_pl} на изображении?"),
            "position": (f"Где находится {nom}?", f"В какой части изображения находится {nom}?"),
            "background": ("Какого цвета фон?", "Какой цвет у фона?"),
            "shape_at_position": (f"Какая фигура {pos}?", f"Что изображено {pos}?"),
            "colour_at_position": (f"Какого цвета фигура {pos}?", f"Какой цвет у фигуры {pos}?"),
            "most_frequent_shape": ("Какая фигура встречается чаще всего?", "Какая фигура повторяется чаще других?"),
            "total_count": ("Сколько всего фигур на картинке?", "Сколько фигур на изображении?"),
            "colour_presence": ("Какой из этих цветов есть на картинке?",),
            "shape_presence": ("Какая из этих фигур есть на картинке?",),
            "shape_absence": ("Какой из этих фигур нет на картинке?",),
            "colour_count": (f"Сколько {self.adjectives[c][3]} фигур на картинке?",) if c else ("",),
            "attribute_binding": ("Что из перечисленного есть на картинке?",),
            "largest_shape": ("Какая фигура самая большая?", "Какая фигура больше остальных?"),
            "size": (cap(f"{nom_pl if q.plural else nom} {self._adj('large', q.shape, q.plural)} или "
                         f"{self._adj('small', q.shape, q.plural)}?"),) if q.shape else ("",),
            "exists": (f"Есть ли на картинке {self._adj(c, q.shape)} {nom}?",) if c and q.shape else ("",),
        }[q.kind]
        return _pick(t, variant)

    def colour_word(self, colour, noun, plural=False):
        return self.adjectives[colour][0] if noun is None else self._adj(colour, noun, plural)

    def shape_word(self, shape):
        return self.shapes[shape][0]

    def count_word(self, n, noun):
        return self.numbers[n][self._fem(noun)]

    def position_word(self, position):
        return self.positions[position]

    def size_word(self, size, noun, plural=False):
        return self._adj(size, noun, plural)

    def description(self, shape, colour, size):
        return f"{self._adj(size, shape)} {self._adj(colour, shape)} {self.shapes[shape][0]}"

    def yes_no(self, value):
        return "да" if value else "нет"


PHRASEBOOKS: dict[str, Phrasebook] = {
    book.lang: book for book in (English(), Chinese(), Portuguese(), Arabic(), Turkish(), Russian())
}


def phrasebook(lang: str) -> Phrasebook:
    if lang not in PHRASEBOOKS:
        raise ValueError(f"unknown language {lang!r}; choose from {LANGUAGES}")
    return PHRASEBOOKS[lang]
