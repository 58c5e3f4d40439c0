"""A field extractor: invoice and e-mail fields from plain text, as JSON.

Rules, not a model: labelled values ("Invoice No: INV-2024-017", "Total due:
$1,234.50", "Due date: 15 March 2024"), e-mail headers (From, To, Subject,
Date), and free-standing e-mail addresses, phone numbers, URLs, IBANs and
amounts. Dates come back as ISO 8601, amounts as numbers with their currency.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from factory.agent import Agent

_MONTHS = {
    name: index
    for index, names in enumerate(
        [
            ("jan", "january"),
            ("feb", "february"),
            ("mar", "march"),
            ("apr", "april"),
            ("may",),
            ("jun", "june"),
            ("jul", "july"),
            ("aug", "august"),
            ("sep", "sept", "september"),
            ("oct", "october"),
            ("nov", "november"),
            ("dec", "december"),
        ],
        start=1,
    )
    for name in names
}
_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_DATE = (
    r"(?:\d{4}-\d{1,2}-\d{1,2}"
    r"|\d{1,2}[/.]\d{1,2}[/.]\d{2,4}"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH}\.?,?\s+\d{{4}}"
    rf"|{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})"
)
_CURRENCY_SIGNS = {"$": "USD", "€": "EUR", "£": "GBP", "¥": "JPY", "₹": "INR"}
_CODES = "USD|EUR|GBP|CHF|JPY|INR|CAD|AUD"
_AMOUNT = (
    rf"(?P<cur1>[$€£¥₹]|{_CODES})?\s?"
    r"(?P<num>\d{1,3}(?:[,\s]\d{3})*(?:\.\d{1,2})?|\d+(?:[.,]\d{1,2})?)"
    rf"\s?(?P<cur2>{_CODES}|[€£$])?"
)

_LABELLED_AMOUNTS = {
    "total": r"(?:grand\s+total|total\s+(?:amount\s+)?due|amount\s+due|balance\s+due|total\s+amount|total)",
    "subtotal": r"(?:sub-?\s?total)",
    "tax": r"(?:vat|gst|sales\s+tax|tax)(?:\s*\(?\d+(?:\.\d+)?\s*%\)?)?",
}
_LABELLED_DATES = {
    "due_date": r"(?:due\s+date|payment\s+due|due\s+by|pay\s+by|due)",
    "invoice_date": r"(?:invoice\s+date|date\s+of\s+issue|issue\s+date|issued(?:\s+on)?|date)",
}
_INVOICE_NUMBER = re.compile(
    r"\b(?:invoice|inv)[^\S\n]*(?:no\.?|number|num\.?|#|id)?[^\S\n]*[:#]?[^\S\n]*(?P<value>[A-Z0-9][A-Z0-9\-/]{2,})",
    re.I,
)
_PO_NUMBER = re.compile(
    r"\b(?:p\.?o\.?|purchase\s+order)[^\S\n]*(?:no\.?|number|#)?[^\S\n]*[:#]?[^\S\n]*(?P<value>[A-Z0-9][A-Z0-9\-/]{2,})",
    re.I,
)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_URL = re.compile(r"\bhttps?://[^\s<>\"')]+", re.I)
_PHONE = re.compile(r"(?<![\w.])\+?\(?\d{1,4}\)?(?:[\s.-]?\(?\d{2,4}\)?){2,4}(?!\w)(?!\.\d)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:\s?[A-Z0-9]{4}){3,7}(?:\s?[A-Z0-9]{1,3})?\b")
_HEADER = re.compile(r"^(?P<name>from|to|cc|subject|date|reply-to)\s*:\s*(?P<value>.+)$", re.I | re.M)
_PARTY = re.compile(
    r"^\s*(?P<label>bill(?:ed)?\s+to|sold\s+to|customer|client|vendor|seller|supplier|from|bill\s+from)\s*:\s*(?P<value>.+)$",
    re.I | re.M,
)

ALL_FIELDS = (
    "kind",
    "invoice_number",
    "po_number",
    "invoice_date",
    "due_date",
    "total",
    "subtotal",
    "tax",
    "currency",
    "vendor",
    "customer",
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "emails",
    "phones",
    "urls",
    "iban",
)


def parse_date(text: str) -> str | None:
    """ISO date of a date written in one of the usual ways (day first for 03/04/2024)."""
    raw = text.strip().lower().replace(",", " ")
    raw = re.sub(r"(\d)(st|nd|rd|th)\b", r"\1", raw)
    try:
        if m := re.fullmatch(r"(\d{4})-(\d{1,2})-(\d{1,2})", raw):
            return date(int(m[1]), int(m[2]), int(m[3])).isoformat()
        if m := re.fullmatch(r"(\d{1,2})[/.](\d{1,2})[/.](\d{2,4})", raw):
            first, second, year = int(m[1]), int(m[2]), int(m[3])
            year += 2000 if year < 100 else 0
            day, month = (first, second) if first > 12 or second <= 12 else (second, first)
            return date(year, month, day).isoformat()
        parts = raw.replace(".", " ").split()
        if len(parts) == 3:
            if parts[0].isdigit() and parts[1] in _MONTHS:
                return date(int(parts[2]), _MONTHS[parts[1]], int(parts[0])).isoformat()
            if parts[0] in _MONTHS and parts[1].isdigit():
                return date(int(parts[2]), _MONTHS[parts[0]], int(parts[1])).isoformat()
    except ValueError:
        return None
    return None


def _header_date(value: str) -> str:
    """An e-mail Date: header as ISO 8601 (the text as it is if it cannot be read)."""
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(value).isoformat()
    except (TypeError, ValueError, IndexError):
        return parse_date(value) or value


def parse_amount(match: re.Match[str]) -> tuple[float, str | None]:
    number = match["num"].replace(" ", "")
    if re.fullmatch(r"\d+,\d{1,2}", number):  # 12,50: a decimal comma
        number = number.replace(",", ".")
    value = float(number.replace(",", ""))
    sign = match["cur1"] or match["cur2"]
    currency = _CURRENCY_SIGNS.get(sign, sign) if sign else None
    return value, currency


class ExtractorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fields: list[str] = Field(default_factory=lambda: list(ALL_FIELDS), description="Which fields to return.")
    patterns: dict[str, str] = Field(
        default_factory=dict, description="Extra fields: name -> regular expression with one group."
    )

    @field_validator("fields")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [f for f in value if f not in ALL_FIELDS]
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: {', '.join(ALL_FIELDS)}")
        return value

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: dict[str, str]) -> dict[str, str]:
        for name, pattern in value.items():
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"pattern {name!r} is not a valid regular expression: {exc}") from None
            if compiled.groups != 1:
                raise ValueError(f"pattern {name!r} needs exactly one (group) around the value")
        return value


class ExtractTask(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=1, description="An invoice, an e-mail, or any text with such fields.")


class Extraction(BaseModel):
    fields: dict[str, Any]
    found: list[str]
    missing: list[str]


class FieldExtractor(Agent):
    """Extract structured fields from invoices and e-mails into JSON."""

    name = "extractor"
    capabilities = ("extract",)
    description = (
        "Extract structured fields from invoices, receipts and e-mails into JSON: invoice number, dates, "
        "totals and tax, currency, sender, recipient, subject, e-mail addresses and phone numbers."
    )
    examples = (
        "Pull the invoice number, total and due date out of this invoice.",
        "Extract the sender, subject and date from this e-mail as JSON.",
        "Parse this receipt into fields.",
    )
    config_model = ExtractorConfig
    task_model = ExtractTask
    config: ExtractorConfig

    def handle(self, task: ExtractTask) -> Extraction:
        text = task.text
        found: dict[str, Any] = {}
        headers: dict[str, str] = {}
        for m in _HEADER.finditer(text):
            headers.setdefault(m["name"].lower(), m["value"].strip())
        is_email = "from" in headers and ("subject" in headers or "to" in headers)
        is_invoice = bool(re.search(r"\b(?:invoice|receipt|bill|amount due|total due)\b", text, re.I))
        found["kind"] = "invoice" if is_invoice else ("email" if is_email else "text")

        for name in ("from", "to", "cc", "subject"):
            if name in headers:
                found[name] = headers[name]
        if "date" in headers:
            found["date"] = _header_date(headers["date"])

        for pattern, name in ((_INVOICE_NUMBER, "invoice_number"), (_PO_NUMBER, "po_number")):
            for m in pattern.finditer(text):
                if any(ch.isdigit() for ch in m["value"]):
                    found.setdefault(name, m["value"])
                    break

        currencies: list[str] = []
        for name, label in _LABELLED_AMOUNTS.items():
            pattern = re.compile(rf"^[^\S\n]*{label}[^\S\n]*[:\-]?[^\S\n]*{_AMOUNT}[^\S\n]*$", re.I | re.M)
            matches = [pm for pm in pattern.finditer(text) if name != "total" or not re.match(r"\s*sub", pm[0], re.I)]
            if matches:
                amount, currency = parse_amount(matches[-1] if name == "total" else matches[0])
                found[name] = amount
                if currency:
                    currencies.append(currency)
        if currencies:
            found["currency"] = currencies[0]
        elif cm := re.search(r"\b(USD|EUR|GBP|CHF|JPY|INR|CAD|AUD)\b|([$€£¥₹])", text):
            found["currency"] = cm[1] or _CURRENCY_SIGNS[cm[2]]

        for name, date_label in _LABELLED_DATES.items():
            date_pattern = re.compile(rf"\b{date_label}\b\s*[:\-]?\s*(?:on\s+)?(?P<value>{_DATE})", re.I)
            for dm in date_pattern.finditer(text):
                if name == "invoice_date" and text[max(0, dm.start() - 4) : dm.start()].strip().lower() == "due":
                    continue  # "Due Date:" is not the invoice's date
                iso = parse_date(dm["value"])
                if iso:
                    found[name] = iso
                    break

        for party in _PARTY.finditer(text):
            role, value = party["label"].lower(), party["value"].strip()
            if role in ("bill to", "billed to", "sold to", "customer", "client"):
                found.setdefault("customer", value)
            elif role in ("vendor", "seller", "supplier", "bill from") or (role == "from" and not is_email):
                found.setdefault("vendor", value)
        if "vendor" not in found and is_invoice and not is_email:
            first = next((line.strip() for line in text.splitlines() if line.strip()), "")
            if first and not re.search(r"\b(?:invoice|receipt)\b", first, re.I) and len(first) < 80:
                found["vendor"] = first

        emails = list(dict.fromkeys(_EMAIL.findall(text)))
        if emails:
            found["emails"] = emails
        urls = list(dict.fromkeys(u.rstrip(".,;") for u in _URL.findall(text)))
        if urls:
            found["urls"] = urls
        # spans that look like phone numbers but are dates, IBANs or document numbers
        taken = [m.span() for m in re.finditer(_DATE, text, re.I)]
        taken += [m.span() for m in _IBAN.finditer(text)]
        taken += [m.span("value") for p in (_INVOICE_NUMBER, _PO_NUMBER) for m in p.finditer(text)]
        phones = []
        for m in _PHONE.finditer(text):
            digits = re.sub(r"\D", "", m[0])
            overlaps = any(start < m.end() and m.start() < end for start, end in taken)
            if 7 <= len(digits) <= 15 and not overlaps:
                phones.append(m[0].strip())
        if phones:
            found["phones"] = list(dict.fromkeys(phones))
        if iban := _IBAN.search(text):
            found["iban"] = iban[0].replace(" ", "")

        fields = {name: found[name] for name in self.config.fields if name in found}
        for name, custom in self.config.patterns.items():
            if pm := re.search(custom, text, re.I | re.M):
                fields[name] = pm.group(1).strip()
        wanted = [*self.config.fields, *self.config.patterns]
        return Extraction(
            fields=fields,
            found=[name for name in wanted if name in fields],
            missing=[name for name in wanted if name not in fields],
        )
