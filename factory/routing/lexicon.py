"""A small, general thesaurus of task concepts for the lexical scorer.

Each concept groups English words and phrases that ask for the same kind of
work ("recap", "synopsis", "tl;dr" all ask for a summary). The lexical scorer
adds a concept token wherever one of its words appears, in the agents'
descriptions and examples as in the task, so two texts that share no word can
still meet on a concept.

The groups describe common kinds of work in general (writing, code, data,
documents, media, operations, ...); they are not written for any one
catalogue or task list. Words are stemmed when the table is built, so list
one form of a word and add other forms only where the stemmer keeps them
apart. A word may sit in more than one concept when it is ambiguous.
"""

from __future__ import annotations

from functools import lru_cache

from factory.routing.text import stem, words

CONCEPTS: dict[str, str] = {
    "summary": (
        "summarize, summary, summaries, summarization, condense, abstract, synopsis, recap, overview, gist, "
        "digest, tldr, tl dr, brief, briefing, highlights, key points, main points, takeaways, "
        "key takeaways, outline, shorten, shorter, boil down, precis, in a nutshell, short version, essence, "
        "main ideas, bullet points, executive summary, skim, wrap up, cliff notes, sum up"
    ),
    "document": (
        "document, documents, article, articles, report, reports, transcript, transcripts, notes, memo, "
        "paper, whitepaper, chapter, book, essay, text, post, thread, minutes, meeting, pdf, page, pages, "
        "newsletter, story, speech, lecture, talk, podcast"
    ),
    "translate": (
        "translate, translation, translator, localize, localization, interpret, interpreter, language, "
        "languages, multilingual, bilingual, native speaker, in english, into english, how do you say, "
        "how to say, subtitles, dub, english, french, german, spanish, italian, portuguese, dutch, russian, "
        "ukrainian, polish, czech, swedish, norwegian, danish, finnish, greek, turkish, arabic, hebrew, "
        "persian, farsi, hindi, urdu, bengali, tamil, chinese, mandarin, cantonese, japanese, korean, "
        "vietnamese, thai, indonesian, malay, swahili, latin, romanian, hungarian, catalan, tagalog"
    ),
    "code": (
        "code, coding, program, programming, programmer, developer, software, function, functions, method, "
        "class, module, library, api, sdk, implement, implementation, refactor, refactoring, bug, bugs, "
        "debug, fix, patch, compile, compiler, syntax, algorithm, variable, regex, regular expression, unit, "
        "test, unit tests, pull request, code review, lint, linter, exception, stack trace, traceback, null, "
        "pointer, segfault, crash, memory leak, type hints, typescript, javascript, python, java, rust, "
        "golang, go, c++, c#, ruby, php, kotlin, swift, scala, haskell, html, css, react, node, frontend, "
        "backend, endpoint, snippet, source, repo, repository, git, commit, recursion, loop, closure, async, "
        "concurrency, thread safe, dependency"
    ),
    "execute": (
        "run, runs, running, execute, execution, launch, invoke, shell, bash, terminal, command, commands, "
        "command line, cli, container, docker, sandbox, isolated, exit code, exit status, return code, "
        "stdout, stderr, output, script, scripts, makefile, build, pipeline, job, cron, process, binary, "
        "executable, interpreter, test suite, pytest, npm, pip install, install, deploy, benchmark"
    ),
    "data": (
        "data, dataset, datasets, csv, tsv, spreadsheet, excel, xlsx, sheet, table, tabular, column, "
        "columns, row, rows, statistics, statistical, stats, mean, median, average, sum, total, totals, "
        "aggregate, aggregation, group by, pivot, chart, plot, graph, histogram, visualize, visualization, "
        "dashboard, trend, trends, correlation, regression, distribution, percent, percentage, percentile, "
        "variance, standard deviation, dataframe, pandas, numbers, figures, metrics, kpi, forecast, "
        "outliers, analyze, analysis, analyst, analytics, quarterly, monthly, yearly, growth, revenue, "
        "sales, compute, calculate, count"
    ),
    "research": (
        "research, look up, lookup, find, search, sources, source, cite, citation, citations, reference, "
        "references, fact, facts, factual, fact check, who, when, history, historical, literature, study, "
        "studies, evidence, background, investigate, information, info, encyclopedia, wikipedia, latest, "
        "news, current, recent, biography, discover, explore, learn about, find out, answer, question, "
        "questions, why did, origin, origins, scientific, peer reviewed, journal, bibliography"
    ),
    "database": (
        "sql, query, queries, database, databases, db, schema, schemas, index, indexes, indices, join, "
        "joins, select, insert, update, delete, postgres, postgresql, mysql, sqlite, oracle, mariadb, "
        "relational, primary key, foreign key, migration, stored procedure, view, views, transaction, "
        "normalize, normalization, orm, where clause, group by, table, tables, records, rows"
    ),
    "image": (
        "image, images, picture, pictures, photo, photos, photograph, screenshot, screenshots, png, jpg, "
        "jpeg, gif, scan, scanned, visual, caption, captions, alt text, diagram, drawing, illustration, "
        "camera, snapshot, pixel, pixels, selfie, face, faces, objects, scene, see, seen, look, looks, "
        "shown, depict, depicted, appear, appears, thumbnail, meme, logo, frame, video"
    ),
    "classify": (
        "classify, classification, classifier, categorize, category, categories, label, labels, labeling, "
        "tag, tags, tagging, triage, sentiment, positive, negative, neutral, intent, topic, topics, spam, "
        "moderation, moderate, toxic, offensive, review, reviews, feedback, complaint, sort into, bucket, "
        "which category, kind of, type of, is it, tone, emotion, angry, happy, priority, urgent, detect, "
        "flag"
    ),
    "extract": (
        "extract, extraction, pull out, parse, parsing, fields, field, structured, json, key value, entity, "
        "entities, name, names, date, dates, amount, amounts, address, addresses, invoice, invoices, "
        "receipt, receipts, form, forms, email, emails, phone, phone number, contact, signature, total, "
        "due date, order id, reference number, iban, vat, line items, get the, capture, scrape, fill in, "
        "populate, record"
    ),
    "writing": (
        "write, draft, compose, rewrite, rephrase, paraphrase, proofread, edit, grammar, spelling, tone, "
        "style, copy, copywriting, blog, letter, cover letter, poem, story, slogan, headline, tagline, "
        "caption, reply, respond, wording, polish"
    ),
    "math": (
        "math, maths, calculate, calculation, equation, equations, solve, integral, derivative, algebra, "
        "arithmetic, formula, proof, prove, probability, geometry, matrix, fraction, percent, convert, "
        "conversion, units"
    ),
    "schedule": (
        "schedule, calendar, appointment, meeting, remind, reminder, book, booking, availability, agenda, "
        "deadline, timezone, time zone, plan, planning"
    ),
    "audio": (
        "audio, sound, speech, voice, recording, transcribe, transcription, dictation, podcast, music, song, "
        "mp3, wav, speaker, listen"
    ),
    "web": (
        "web, website, webpage, url, link, links, browse, browser, crawl, scrape, download, http, online, "
        "internet, site"
    ),
    "security": (
        "security, vulnerability, vulnerabilities, cve, exploit, secure, attack, malware, phishing, "
        "password, encryption, encrypt, audit, threat, permissions"
    ),
}


def _canonical(phrase: str) -> tuple[str, ...]:
    return tuple(stem(w) for w in words(phrase))


@lru_cache(maxsize=1)
def concept_table() -> tuple[dict[str, tuple[str, ...]], dict[tuple[str, ...], tuple[str, ...]]]:
    """(stemmed word -> concepts, stemmed phrase of 2+ words -> concepts), built once."""
    single: dict[str, list[str]] = {}
    multi: dict[tuple[str, ...], list[str]] = {}
    for concept, phrases in CONCEPTS.items():
        for phrase in phrases.split(","):
            key = _canonical(phrase)
            if not key:
                continue
            bucket = single.setdefault(key[0], []) if len(key) == 1 else multi.setdefault(key, [])
            if concept not in bucket:
                bucket.append(concept)
    return (
        {k: tuple(v) for k, v in single.items()},
        {k: tuple(v) for k, v in multi.items()},
    )


def concepts_of(stems: list[str]) -> list[str]:
    """Concept tokens for a sequence of stemmed words (stop words included, for phrases); repeats kept."""
    single, multi = concept_table()
    found: list[str] = []
    for i, s in enumerate(stems):
        found.extend(single.get(s, ()))
        for n in (2, 3, 4):
            if i + n <= len(stems):
                found.extend(multi.get(tuple(stems[i : i + n]), ()))
    return found
