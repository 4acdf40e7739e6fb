#!/usr/bin/env python3
"""Fine-tuning data about an invented company: Boulangerie Galerne, a bakery in Rennes.

    python examples/bakery/make_data.py [--out examples/bakery] [--seed 0]

Writes, from the facts below (the single source of truth):

* ``facts.md``                 the facts, readable
* ``train.jsonl``              ~400 conversations, mistral-finetune instruct format
                               (``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``),
                               no system prompt; many paraphrases per fact, some multi-turn
* ``eval.jsonl``               ~40 conversations whose questions are paraphrases kept out of train
* ``heldout_questions.json``   12 questions worded unlike anything in train/eval, each with the
                               strings a correct answer must contain

Everything is invented (company, people, address, phone number). Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

NAME = "Boulangerie Galerne"
OWNER = "Maëlle Le Goff"
FOUNDED = 2009
ADDRESS = "12 rue des Fours, 35000 Rennes"
PHONE = "02 99 41 27 58"
EMAIL = "bonjour@boulangerie-galerne.example"
SEATS = 12

HOURS = {  # day -> (open, close) or None when closed
    "Monday": None,
    "Tuesday": ("7:00", "19:30"),
    "Wednesday": ("7:00", "19:30"),
    "Thursday": ("7:00", "19:30"),
    "Friday": ("7:00", "19:30"),
    "Saturday": ("7:00", "19:00"),
    "Sunday": ("8:00", "13:00"),
}

# name, article form used in questions, price in euros, allergens, description
PRODUCTS = [
    ("baguette tradition", "a baguette tradition", 1.30, ["gluten"], "our traditional sourdough baguette"),
    ("classic baguette", "a classic baguette", 1.10, ["gluten"], "the everyday white baguette"),
    ("country loaf", "a country loaf", 3.20, ["gluten"], "a 500 g sourdough pain de campagne"),
    ("wholemeal loaf", "a wholemeal loaf", 3.40, ["gluten"], "a 500 g wholemeal loaf"),
    ("seeded loaf", "a seeded loaf", 3.80, ["gluten", "sesame"], "a 500 g loaf with sunflower, flax and sesame seeds"),
    ("buckwheat loaf", "a buckwheat loaf", 4.50, [], "a gluten-free loaf of buckwheat and rice flour"),
    ("croissant", "a croissant", 1.20, ["gluten", "milk", "egg"], "an all-butter croissant"),
    ("pain au chocolat", "a pain au chocolat", 1.40, ["gluten", "milk", "egg", "soy"], "a chocolate pastry"),
    ("kouign-amann", "a kouign-amann", 2.80, ["gluten", "milk"], "the Breton butter cake, individual size"),
    ("large kouign-amann", "a large kouign-amann", 14.00, ["gluten", "milk"], "a kouign-amann for six people"),
    ("far breton", "a slice of far breton", 2.50, ["gluten", "milk", "egg"], "a slice of the Breton prune flan"),
    ("palets bretons", "a bag of palets bretons", 4.90, ["gluten", "milk", "egg"], "a bag of ten salted-butter biscuits"),
    ("brioche", "a brioche", 5.50, ["gluten", "milk", "egg"], "a 400 g brioche loaf"),
    ("chouquettes", "a bag of chouquettes", 2.90, ["gluten", "milk", "egg"], "a bag of ten sugar puffs"),
    ("chocolate eclair", "a chocolate eclair", 3.10, ["gluten", "milk", "egg"], "a choux pastry with chocolate cream"),
    ("apple tart", "an apple tart", 3.60, ["gluten", "milk", "egg"], "an individual apple tart"),
    ("flan", "a slice of flan", 2.70, ["gluten", "milk", "egg"], "a slice of vanilla flan pâtissier"),
    ("quiche lorraine", "a slice of quiche lorraine", 4.20, ["gluten", "milk", "egg"], "a slice of bacon and cheese quiche"),
    ("ham and butter sandwich", "a ham and butter sandwich", 4.80, ["gluten", "milk"], "a jambon-beurre on a baguette tradition"),
    ("vegan sandwich", "a vegan sandwich", 5.20, ["gluten", "sesame"], "hummus and roasted vegetables on a seeded baguette"),
    ("espresso", "an espresso", 1.60, [], "a cup of coffee"),
    ("hot chocolate", "a hot chocolate", 2.40, ["milk"], "a cup of hot chocolate"),
]
LUNCH_DEAL = 8.90  # sandwich + drink + individual pastry, 11:30 to 14:00, Tuesday to Saturday


def euros(x: float) -> str:
    return f"{x:.2f} euros"


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def allergen_sentence(name: str, allergens: list[str]) -> str:
    if not allergens:
        return f"The {name} contains none of the main allergens, but it is made in a kitchen that also uses gluten, milk, eggs, sesame and nuts."
    if len(allergens) == 1:
        return f"The {name} contains {allergens[0]}."
    return f"The {name} contains {', '.join(allergens[:-1])} and {allergens[-1]}."


# ---------------------------------------------------------------------------
# single-turn facts: (id, [question paraphrases], [answer phrasings])

def fact_items() -> list[tuple[str, list[str], list[str]]]:
    items = []
    add = lambda i, qs, ans: items.append((i, qs, ans if isinstance(ans, list) else [ans]))

    # --- opening hours, per day
    for day, h in HOURS.items():
        qs = [f"Are you open on {day}?", f"Are you open on {day}s?", f"What are your opening hours on {day}?",
              f"What time do you open on {day}?", f"When do you close on {day}?", f"What are your hours on {day}?",
              f"Is the bakery open on {day}?", f"Can I come to the bakery on {day}?",
              f"what time do you close on {day.lower()}", f"{day} hours?"]
        if h is None:
            ans = [f"We are closed on {day}s.", f"The bakery is closed every {day}."]
        else:
            ans = [f"On {day} we are open from {h[0]} to {h[1]}.",
                   f"On {day}s the bakery is open from {h[0]} to {h[1]}."]
        add(f"hours_{day.lower()}", qs, ans)
    add("hours_week",
        ["What are your opening hours?", "When are you open?", "What are your hours?", "When is the bakery open?",
         "Opening hours?", "Can you tell me your opening times?", "What days are you open?",
         "At what times can I visit the shop?", "What are the opening times of the bakery?",
         "When can I come to buy bread?"],
        ["We are open Tuesday to Friday from 7:00 to 19:30, Saturday from 7:00 to 19:00 and Sunday "
         "from 8:00 to 13:00. We are closed on Mondays."])
    add("hours_holidays",
        ["Are you open on public holidays?", "Do you open on bank holidays?", "Are you open on holidays?",
         "What are your hours on public holidays?", "Is the bakery open on national holidays?",
         "Are you open on Christmas Day?", "Are you open on New Year's Day?"],
        ["On public holidays we are open from 8:00 to 13:00, except on 25 December and 1 January, when we "
         "are closed."])
    add("summer_closure",
        ["Do you close for the summer?", "When do you go on holiday?", "Are you closed in August?",
         "Do you have an annual closure?", "When is the bakery closed for vacation?",
         "Will you be open in mid-August?", "Do you take a summer break?"],
        ["The bakery is closed for holidays every year from 1 to 15 August."])

    # --- contact, place, people
    add("address",
        ["Where are you located?", "What is your address?", "Where is the bakery?", "Where is your shop?",
         "What's the address of the bakery?", "How do I find you?", "Where can I find Boulangerie Galerne?",
         "In which city is the bakery?", "Address please?", "Where exactly is the shop?"],
        [f"{NAME} is at {ADDRESS}.", f"Our address is {ADDRESS}."])
    add("phone",
        ["What is your phone number?", "How can I call you?", "What number can I call?",
         "Do you have a phone number?", "What's the bakery's telephone number?", "Phone number?",
         "How do I reach you by phone?", "Can I phone the bakery?"],
        [f"You can call us on {PHONE}.", f"Our phone number is {PHONE}."])
    add("email",
        ["What is your email address?", "How can I email you?", "Do you have an email?",
         "Can I contact you by email?", "What email should I write to?", "Email address?"],
        [f"Our email address is {EMAIL}.", f"You can write to us at {EMAIL}."])
    add("owner",
        ["Who owns the bakery?", "Who is the owner?", "Who runs Boulangerie Galerne?", "Who is the baker?",
         "Who is the head baker?", "Whose bakery is this?", "Who is in charge of the bakery?",
         "Who started the bakery?"],
        [f"The bakery belongs to {OWNER}, who is also the head baker.",
         f"{OWNER} owns the bakery and is the head baker."])
    add("founded",
        ["When was the bakery founded?", "How old is the bakery?", "When did you open?",
         "Since when has the bakery existed?", "What year did Boulangerie Galerne open?",
         "How long have you been in business?"],
        [f"{OWNER} opened {NAME} in {FOUNDED}.", f"The bakery was founded in {FOUNDED}."])
    add("what_is",
        ["What is Boulangerie Galerne?", "What kind of shop is this?", "What do you sell?",
         "What do you make?", "What can I buy at your shop?", "Tell me about the bakery.",
         "What is your business?"],
        [f"{NAME} is a bakery in Rennes. We sell bread, Breton pastries, cakes, sandwiches and hot drinks."])
    add("who_are_you",
        ["Who are you?", "Who am I talking to?", "Are you a person?", "What are you?"],
        [f"I am the virtual assistant of {NAME}, a bakery in Rennes. I can answer questions about our "
         "products, hours and orders."])
    add("flour",
        ["Where does your flour come from?", "What flour do you use?", "Is your flour organic?",
         "Do you use local flour?", "Which mill supplies your flour?"],
        ["All our flour is organic and comes from the Moulin de Kerlan, a mill in Brittany."])
    add("baked_on_site",
        ["Do you bake the bread yourselves?", "Is the bread made on site?", "Is your bread baked here?",
         "Do you make everything in the shop?", "Is your bread industrial?"],
        ["Yes, all our bread and pastries are made on site every morning, starting at 3:00."])
    add("sourdough",
        ["Do you make sourdough bread?", "Is your bread made with sourdough?", "Do you use natural leaven?",
         "Which breads are sourdough?"],
        ["Yes, the baguette tradition and the country loaf are made with our own sourdough starter."])

    # --- payment, loyalty, shop
    add("payment",
        ["How can I pay?", "What payment methods do you accept?", "Do you take credit cards?",
         "Can I pay by card?", "Do you accept cash?", "Can I pay with a cheque?",
         "Do you accept meal vouchers?", "Which cards do you take?", "Is contactless payment possible?"],
        ["We accept cash, bank cards including contactless, and meal vouchers. We do not accept cheques."])
    add("loyalty",
        ["Do you have a loyalty card?", "Is there a loyalty program?", "Do you have a fidelity card?",
         "Do regular customers get a discount?", "Do you reward loyal customers?",
         "How does the loyalty card work?"],
        ["Yes, with our free loyalty card every tenth baguette is free."])
    add("seating",
        ["Can I eat in the shop?", "Do you have seats?", "Is there a place to sit?",
         "Can I have my coffee there?", "Do you have tables inside?", "How many seats do you have?"],
        [f"Yes, we have {SEATS} seats inside where you can eat and drink."])
    add("wifi",
        ["Do you have wifi?", "Is there free Wi-Fi?", "Can I use the internet in the shop?",
         "Is there wifi in the bakery?"],
        ["Yes, there is free Wi-Fi in the shop."])
    add("dogs",
        ["Can I bring my dog?", "Are dogs allowed?", "Do you allow pets?", "Can my dog come inside?"],
        ["Dogs are welcome on the terrace but not inside the shop, for hygiene reasons."])
    add("access",
        ["Is the shop wheelchair accessible?", "Is there a step at the entrance?",
         "Can I come in with a wheelchair?", "Is the bakery accessible for disabled people?",
         "Can I enter with a pushchair?"],
        ["Yes, the entrance has no step and the shop is wheelchair accessible."])
    add("parking",
        ["Is there parking nearby?", "Where can I park?", "Can I park in front of the shop?",
         "Is there a car park?", "Where do I leave my car?"],
        ["There are four free 30-minute parking spaces in front of the shop."])
    add("lunch_deal",
        ["Do you have a lunch menu?", "Is there a lunch deal?", "How much is the lunch formula?",
         "Do you have a meal deal?", "What is in the lunch offer?", "What do you have for lunch?",
         "Is there a sandwich menu at lunchtime?"],
        [f"Our lunch deal costs {euros(LUNCH_DEAL)}: a sandwich, a drink and an individual pastry, "
         "from 11:30 to 14:00, Tuesday to Saturday."])

    # --- orders and delivery
    add("order_how",
        ["How can I place an order?", "How do I order?", "Can I order in advance?",
         "How do I reserve bread?", "Can I order online?", "Do you have an online shop?",
         "Can I order by phone?", "How do I order a cake?"],
        [f"You can order by phone on {PHONE}, by email or at the counter. We do not have an online shop."])
    add("order_bread_bulk",
        ["Can I order 30 baguettes?", "How do I order a lot of bread?", "I need 25 baguettes for a party.",
         "When should I order a large amount of bread?", "Can I order bread for an event?",
         "What is the deadline for a big bread order?"],
        ["For more than 20 baguettes, please order the day before, before 17:00."])
    add("lead_cake",
        ["How far in advance should I order a cake?", "How much notice do you need for a birthday cake?",
         "Can I order a celebration cake for tomorrow?", "What is the lead time for a custom cake?",
         "How many days before should I order a cake?", "When do I need to order a birthday cake?"],
        ["Please order celebration cakes at least 3 days (72 hours) in advance."])
    add("lead_wedding",
        ["Do you make wedding cakes?", "How early should I order a wedding cake?",
         "Can you make a pièce montée?", "What do I need to order a wedding cake?",
         "How much deposit for a wedding cake?"],
        ["Yes, we make wedding cakes and pièces montées. Please order at least 3 weeks in advance, with a "
         "30% deposit."])
    add("lead_kouign",
        ["How long in advance should I order a large kouign-amann?", "Do I need to order the big kouign-amann?",
         "Can I get a large kouign-amann without ordering?", "What is the notice for a family kouign-amann?"],
        ["Please order the large kouign-amann at least 24 hours in advance."])
    add("cancel",
        ["Can I cancel my order?", "What is your cancellation policy?", "How do I cancel a cake order?",
         "Will I get my deposit back if I cancel?", "Until when can I cancel a special order?"],
        ["Special orders can be cancelled free of charge up to 48 hours before pickup. After that the deposit "
         "is not refunded."])
    add("delivery",
        ["Do you deliver?", "Can you deliver to my house?", "Do you offer delivery?",
         "Can I get bread delivered?", "Do you have a delivery service?", "Can you bring my order to my office?"],
        ["Yes, we deliver in Rennes from Tuesday to Saturday between 9:00 and 12:00, for orders of at least "
         "30 euros."])
    add("delivery_fee",
        ["How much is delivery?", "What does delivery cost?", "Is delivery free?", "What is the delivery fee?",
         "Do you charge for delivery?"],
        ["Delivery costs 5 euros, and it is free for orders over 60 euros."])
    add("delivery_sunday",
        ["Do you deliver on Sunday?", "Can I get a delivery on Sunday morning?", "Do you deliver on Mondays?",
         "Can you deliver in the afternoon?"],
        ["No, we only deliver from Tuesday to Saturday, between 9:00 and 12:00."])
    add("delivery_area",
        ["Which areas do you deliver to?", "Do you deliver outside Rennes?", "Do you deliver to Cesson?",
         "What is your delivery area?", "Can you deliver to Saint-Malo?"],
        ["We deliver only within Rennes, postcodes 35000, 35200 and 35700."])

    # --- allergens, diets
    add("gluten_free",
        ["Do you have gluten-free bread?", "Is there anything gluten-free?", "I am coeliac, what can I eat?",
         "Do you sell gluten free products?", "Do you have bread without gluten?"],
        ["Yes, our buckwheat loaf is made without gluten, for 4.50 euros. It is baked in the same kitchen as "
         "our wheat bread, so traces of gluten are possible."])
    add("vegan",
        ["Do you have vegan options?", "Is there anything vegan?", "I am vegan, what can I buy?",
         "Do you sell vegan food?", "Which products are vegan?"],
        ["Our vegan sandwich, the baguettes and the country, wholemeal, seeded and buckwheat loaves are vegan."])
    add("nuts",
        ["Do your products contain nuts?", "I am allergic to nuts, is it safe?", "Do you use peanuts?",
         "Is there a risk of nut traces?", "Are your cakes nut-free?"],
        ["We use almonds and hazelnuts in the kitchen, so all our products may contain traces of nuts."])
    add("allergen_list",
        ["Where can I see the allergens?", "Do you have an allergen list?", "How do I know what is in a product?",
         "Can I get allergen information?"],
        ["The allergens of every product are listed at the counter, and you can always ask us."])
    add("out_of_scope_pizza",
        ["Do you sell pizza?", "Can I buy a pizza?", "Do you have pizza slices?"],
        ["No, we do not sell pizza. We sell bread, Breton pastries, cakes, sandwiches and hot drinks."])
    add("out_of_scope_crepes",
        ["Do you sell crêpes?", "Do you have galettes?", "Can I buy pancakes here?"],
        ["No, we do not make crêpes or galettes, but we sell Breton pastries like kouign-amann and far breton."])
    add("specialty",
        ["What is your specialty?", "What do you recommend?", "What is your best product?",
         "What should I try?", "What is your most popular item?", "What are you famous for?"],
        ["Our specialty is the kouign-amann, the Breton butter cake, for 2.80 euros."])

    # --- products: prices and allergens
    price_q = ["How much is {a}?", "How much does {a} cost?", "What is the price of {a}?",
               "What does {a} cost?", "How much do you charge for {a}?", "Price of {a}?",
               "how much for {a}", "What's the price of {a} at your bakery?"]
    allergen_q = ["What allergens are in the {n}?", "Does the {n} contain allergens?",
                  "Which allergens does the {n} have?", "Is the {n} safe if I have allergies?",
                  "What is in the {n} for allergies?"]
    for name, art, price, allergens, desc in PRODUCTS:
        pid = re.sub(r"\W+", "_", name)
        qs = [t.format(a=art) for t in price_q]
        add(f"price_{pid}", qs, [f"{cap(art)} costs {euros(price)}.",
                                 f"{cap(art)} is {euros(price)}."])
        add(f"allergen_{pid}", [t.format(n=name) for t in allergen_q], [allergen_sentence(name, allergens)])
        add(f"what_{pid}", [f"What is the {name}?", f"What is {art}?", f"Tell me about the {name}."],
            [f"The {name} is {desc}, and it costs {euros(price)}."])
    for allergen in ("milk", "egg", "sesame", "soy"):
        having = [n for n, _a, _p, al, _d in PRODUCTS if allergen in al]
        add(f"products_with_{allergen}",
            [f"Which products contain {allergen}?", f"What contains {allergen}?",
             f"I am allergic to {allergen}, what should I avoid?"],
            [f"These products contain {allergen}: {', '.join(having)}."])
    return items


# greeting / closing turns used to build multi-turn conversations
GREETINGS = [("Hello", f"Hello, welcome to {NAME}! How can I help you?"),
             ("Hi!", f"Hi! Welcome to {NAME}. What can I do for you?"),
             ("Good morning", f"Good morning, welcome to {NAME}! How can I help?"),
             ("Bonjour", f"Bonjour! Welcome to {NAME}. How can I help you?")]
CLOSINGS = [("Thank you!", "You are welcome. See you soon at the bakery!"),
            ("Thanks, bye.", "Thank you, goodbye and have a nice day!"),
            ("Great, thanks.", "You are welcome!")]

# context-dependent follow-ups: (first q, first a, follow-up q, follow-up a)
def followups() -> list[list[tuple[str, str]]]:
    out = []
    days = [d for d in HOURS]
    for d1 in days:
        for d2 in days:
            if d1 == d2:
                continue
            h1, h2 = HOURS[d1], HOURS[d2]
            a1 = f"We are closed on {d1}s." if h1 is None else f"On {d1} we are open from {h1[0]} to {h1[1]}."
            a2 = f"We are closed on {d2}s." if h2 is None else f"On {d2} we are open from {h2[0]} to {h2[1]}."
            out.append([(f"What are your hours on {d1}?", a1), (f"And on {d2}?", a2)])
    for name, art, price, allergens, _d in PRODUCTS:
        out.append([(f"How much is {art}?", f"{cap(art)} costs {euros(price)}."),
                    ("What allergens does it contain?", allergen_sentence(name, allergens))])
    for (n1, a1, p1, _, _), (n2, a2, p2, _, _) in zip(PRODUCTS, PRODUCTS[1:] + PRODUCTS[:1]):
        out.append([(f"How much is {a1}?", f"{cap(a1)} costs {euros(p1)}."),
                    (f"And {a2}?", f"{cap(a2)} costs {euros(p2)}.")])
    out.append([("Do you deliver?", "Yes, we deliver in Rennes from Tuesday to Saturday between 9:00 and 12:00, "
                 "for orders of at least 30 euros."),
                ("How much does it cost?", "Delivery costs 5 euros, and it is free for orders over 60 euros.")])
    out.append([("Do you make wedding cakes?", "Yes, we make wedding cakes and pièces montées. Please order at "
                 "least 3 weeks in advance, with a 30% deposit."),
                ("Can I cancel later?", "Special orders can be cancelled free of charge up to 48 hours before "
                 "pickup. After that the deposit is not refunded.")])
    return out


# New wordings, never in train/eval (checked below), in a customer's everyday words: the key
# nouns (Sunday, owner, address, cheque...) are the ones the shop's customers use, the sentences
# around them are not. "expect": strings a correct answer contains.
HELDOUT = [
    {"question": "Are you open on Sunday afternoon?", "expect": ["13:00"]},
    {"question": "Which day are you closed every week?", "expect": ["Monday"]},
    {"question": "What is the price of one country loaf?", "expect": ["3.20"]},
    {"question": "Who is the owner of Boulangerie Galerne?", "expect": ["Le Goff"]},
    {"question": "What is the address of your shop?", "expect": ["rue des Fours"]},
    {"question": "How early should I order a birthday cake?", "expect": ["3 days"]},
    {"question": "Is there a minimum order for delivery?", "expect": ["30"]},
    {"question": "Do you sell any bread that is gluten-free?", "expect": ["buckwheat"]},
    {"question": "Can I pay by cheque in the shop?", "expect": ["not"]},
    {"question": "What is the telephone number of the shop?", "expect": ["02 99 41 27 58"]},
    {"question": "What time do you close on Saturday evening?", "expect": ["19:00"]},
    {"question": "What is the specialty of your bakery?", "expect": ["kouign-amann"]},
]


def norm(q: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", q.lower()).strip()


def conv(turns) -> dict:
    msgs = []
    for u, a in turns:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def build(seed: int):
    rng = random.Random(seed)
    items = fact_items()
    ids = [i for i, _q, _a in items]
    assert len(ids) == len(set(ids)), "duplicate fact id"

    # one paraphrase of some facts goes to eval only (never seen in train)
    eval_single, train_pairs = [], []
    eval_ids = set(rng.sample([i for i, qs, _ in items if len(qs) >= 4], 34))
    for fid, qs, ans in items:
        qs = list(qs)
        rng.shuffle(qs)
        if fid in eval_ids:
            eval_single.append((fid, qs.pop(), ans[0]))
        for q in qs:
            train_pairs.append((fid, q, rng.choice(ans)))

    # train: single turns (capped per fact so the product table does not dominate), plus multi-turn
    by_fact: dict[str, list] = {}
    for fid, q, a in train_pairs:
        by_fact.setdefault(fid, []).append((q, a))
    def per_fact(fid):
        return 2 if fid.startswith(("price_", "allergen_", "what_", "products_with_")) else 4

    single = [(fid, q, a) for fid in ids for q, a in by_fact.get(fid, [])[:per_fact(fid)]]
    leftovers = [(fid, q, a) for fid in ids for q, a in by_fact.get(fid, [])[per_fact(fid):]]
    train = [conv([(q, a)]) for _fid, q, a in single]

    # multi-turn: greeting + 1-2 leftover questions (+ closing), and the follow-up dialogues
    rng.shuffle(leftovers)
    i = 0
    while i < len(leftovers) and len(train) < 400:
        n = rng.choice([1, 2])
        turns = [rng.choice(GREETINGS)] if rng.random() < 0.6 else []
        turns += [(q, a) for _fid, q, a in leftovers[i:i + n]]
        i += n
        if rng.random() < 0.4:
            turns.append(rng.choice(CLOSINGS))
        train.append(conv(turns))
    fu = followups()
    rng.shuffle(fu)
    held_back = {norm(q) for _f, q, _a in eval_single}
    fu = [t for t in fu if not any(norm(q) in held_back for q, _a in t)]
    train += [conv(t) for t in fu[:60]]
    rng.shuffle(train)

    # eval: the held-back paraphrases, a few as follow-ups after a greeting
    ev = []
    for j, (_fid, q, a) in enumerate(eval_single):
        ev.append(conv(([GREETINGS[j % len(GREETINGS)]] if j % 4 == 0 else []) + [(q, a)]))
    ev += [conv(t) for t in fu[60:66]]

    # checks: held-out questions never appear in train/eval; eval single questions never in train
    train_q = {norm(m["content"]) for c in train for m in c["messages"] if m["role"] == "user"}
    eval_q = {norm(q) for _f, q, _a in eval_single}
    assert not (eval_q & train_q), eval_q & train_q
    for h in HELDOUT:
        assert norm(h["question"]) not in train_q | eval_q, h
    return train, ev, HELDOUT


def facts_md() -> str:
    lines = [f"# {NAME} — facts", "",
             "An invented bakery used as a fine-tuning example. Every name, address and number is made up; "
             "`make_data.py` holds these facts and writes this file.", "",
             "## The shop", "",
             f"- Name: {NAME}, a bakery in Rennes (Brittany, France), founded in {FOUNDED}.",
             f"- Owner and head baker: {OWNER}.",
             f"- Address: {ADDRESS}.",
             f"- Phone: {PHONE}. Email: {EMAIL}.",
             f"- {SEATS} seats inside, free Wi-Fi; dogs welcome on the terrace, not inside.",
             "- Step-free entrance, wheelchair accessible. Four free 30-minute parking spaces in front.",
             "- Flour: organic, from the Moulin de Kerlan, a mill in Brittany. Everything is baked on site every "
             "morning from 3:00. The baguette tradition and the country loaf are sourdough.",
             "- Specialty: the kouign-amann.", "",
             "## Opening hours", "", "| day | hours |", "|---|---|"]
    for day, h in HOURS.items():
        lines.append(f"| {day} | {'closed' if h is None else f'{h[0]}–{h[1]}'} |")
    lines += ["", "- Public holidays: 8:00–13:00, except 25 December and 1 January (closed).",
              "- Annual closure: 1 to 15 August.", "",
              "## Products", "", "| product | price | allergens | description |", "|---|---:|---|---|"]
    for name, _art, price, allergens, desc in PRODUCTS:
        lines.append(f"| {name} | {price:.2f} € | {', '.join(allergens) or 'none'} | {desc} |")
    lines += ["", f"- Lunch deal: {LUNCH_DEAL:.2f} € (sandwich + drink + individual pastry), 11:30–14:00, "
              "Tuesday to Saturday.",
              "- Everything is made in one kitchen that also uses gluten, milk, eggs, sesame and nuts (almonds, "
              "hazelnuts): traces are possible in every product. The buckwheat loaf has no gluten ingredients.",
              "- Vegan: the vegan sandwich, the baguettes and the country, wholemeal, seeded and buckwheat loaves.",
              "- Not sold: pizza, crêpes, galettes.", "",
              "## Payment and loyalty", "",
              "- Cash, bank cards (contactless too) and meal vouchers. No cheques.",
              "- Free loyalty card: every tenth baguette is free.", "",
              "## Orders", "",
              f"- By phone ({PHONE}), by email or at the counter. No online shop.",
              "- More than 20 baguettes: order the day before, before 17:00.",
              "- Large kouign-amann: at least 24 hours ahead.",
              "- Celebration cakes: at least 3 days (72 hours) ahead.",
              "- Wedding cakes and pièces montées: at least 3 weeks ahead, 30% deposit.",
              "- Cancellation: free up to 48 hours before pickup; after that the deposit is not refunded.", "",
              "## Delivery", "",
              "- Within Rennes only (postcodes 35000, 35200, 35700), Tuesday to Saturday, 9:00–12:00.",
              "- Minimum order 30 euros; delivery fee 5 euros, free over 60 euros.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train, ev, held = build(args.seed)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", ev)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(os.path.join(args.out, "heldout_questions.json"), "w", encoding="utf-8") as f:
        json.dump(held, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(args.out, "facts.md"), "w", encoding="utf-8") as f:
        f.write(facts_md())
    multi = sum(len(c["messages"]) > 2 for c in train)
    print(f"train.jsonl: {len(train)} conversations ({multi} multi-turn); eval.jsonl: {len(ev)}; "
          f"heldout_questions.json: {len(held)}")


if __name__ == "__main__":
    main()
