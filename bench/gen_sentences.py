#!/usr/bin/env python3
"""Writes N deterministic English-like sentences, one per line, for the embedding benchmark.

    python3 bench/gen_sentences.py --out lines.txt [--n 1000] [--seed 14]
        [--min-words 10] [--max-words 60]

Words come from a built-in list of common English words (no network, standard library
only), with capitalised sentence starts, some capitalised "names", commas, semicolons,
occasional numbers, and a closing '.', '?' or '!'. The same arguments always give the
same file, on any Python 3.
"""

import argparse
import random

WORDS = """
a about above across act add after again against age ago agree air all allow almost alone
along already also although always among amount an and animal another answer any anyone
appear apple area arm around arrive art as ask at away baby back bad bag ball bank base be
bear beautiful because become bed been before begin behind believe below best better between
big bird black blue board boat body book both box boy bread break bring brother brown build
burn business busy but buy by call came can car care carry case cat catch cause center
certain chair chance change child city class clean clear close cloud cold color come common
company complete computer consider contain continue control cook cool corner correct cost
could country course cover create cross cup cut dance dark data day dead deal dear decide
deep describe design develop did die different difficult dinner direct discover do doctor
does dog door down draw dream dress drink drive drop dry during each early earth east easy
eat edge effect egg eight either else end energy enough enter even evening event ever every
example experience explain eye face fact fall family far farm fast father fear feel few
field fight figure fill final find fine finger finish fire first fish five floor flower fly
follow food foot for force forest form forward four free friend from front fruit full game
garden gave general get girl give glass go gold good government great green ground group
grow guess hair half hand happen happy hard has hat have he head hear heart heat heavy help
her here high hill him his history hold home hope horse hot hour house how huge human
hundred idea if important in include industry information inside instead interest into
island it its job join just keep key kind king kitchen know land language large last late
laugh law lay lead learn least leave left leg less let letter level library life light like
line list listen little live long look lose lot loud love low machine made main make man
many map mark market matter may me mean measure meet member memory method middle might mile
milk mind minute miss modern moment money month moon more morning most mother mountain move
much music must name nation natural near need never new next night nine no noise north note
nothing notice now number object ocean of off offer office often old on once one only open
order other our out outside over own page paint paper part party pass past pattern pay
people perhaps person picture piece place plan plant play please point poor popular position
possible power present pretty price problem process produce product program provide public
pull push put question quick quiet quite rain raise reach read ready real reason receive
record red remember repeat report rest result return rich ride right river road rock room
round rule run safe said same save say school science sea season seat second see seem sell
send sense sentence serve set seven several shape share she ship shop short should show side
sign simple since sing sister sit six size sky sleep slow small smile snow so soft soil some
something song soon sound south space speak special spend spring square stand star start
state station stay step still stone stop store story street strong student study such sudden
summer sun support sure surface system table take talk tall teach team tell ten test than
that the their them then there these they thing think third this those though thought three
through time today together told tomorrow too took top toward town track trade train travel
tree true try turn twenty two under understand until up upon us use usual valley very view
village visit voice wait walk wall want warm was wash watch water wave way we wear weather
week weight well went were west what wheel when where which while white who whole why wide
wild will wind window winter wish with without woman wonder wood word work world would write
wrong year yellow yes yet you young your
""".split()

NAMES = """Alice Bob Carol David Emma Frank Grace Henry London Paris Tokyo Berlin Monday
Friday January April Python Europe Africa Amazon Thames""".split()

ENDINGS = [".", ".", ".", ".", ".", ".", "?", "!"]


def sentence(rng, min_words, max_words):
    n = rng.randint(min_words, max_words)
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.05:
            w = rng.choice(NAMES)
        elif r < 0.08:
            w = str(rng.choice([rng.randint(0, 99), rng.randint(100, 9999),
                                round(rng.uniform(0, 100), 1)]))
        else:
            w = rng.choice(WORDS)
        if i == 0:
            w = w[:1].upper() + w[1:]
        if i < n - 1:
            p = rng.random()
            if p < 0.08:
                w += ","
            elif p < 0.095:
                w += ";"
        out.append(w)
    return " ".join(out) + rng.choice(ENDINGS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output file, one sentence per line")
    ap.add_argument("--n", type=int, default=1000, help="number of sentences (%(default)s)")
    ap.add_argument("--seed", type=int, default=14, help="random seed (%(default)s)")
    ap.add_argument("--min-words", type=int, default=10)
    ap.add_argument("--max-words", type=int, default=60)
    args = ap.parse_args()
    if not (1 <= args.min_words <= args.max_words):
        ap.error("need 1 <= --min-words <= --max-words")
    rng = random.Random(args.seed)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for _ in range(args.n):
            f.write(sentence(rng, args.min_words, args.max_words) + "\n")


if __name__ == "__main__":
    main()
