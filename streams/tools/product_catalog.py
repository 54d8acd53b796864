"""Generate the demo/test product master: ``streams/tools/data/product_master.csv``.

The master holds only controlled items (the schedule set has no
"non-controlled" value). It covers the drug families a distributor's
suspicious-order monitoring cares about, with NDCs written the way labelers
publish them (4-4-2, 5-3-2, 5-4-1 or 5-4-2) and normalized to 11-digit 5-4-2
on the way out.

Provenance and simplifications (documented so nobody mistakes this for a
regulatory NDC dictionary):

* **Methadone** rows are the 20 most frequent NDCs of the real ARCOS sample
  (``shared/data/arcos`` beside the repository, see ``connectors.sources.arcos_replay.arcos_data_dir``;
  95.7% of its 37,214 transactions), with the
  sample's dosage units per package, base weight (``CALC_BASE_WT_IN_GM`` /
  dosage units, e.g. 10 mg methadone HCl = 8.944 mg base) and its
  ``MME_Conversion_Factor`` (4 for 5/10 mg tablets, 8 for 40 mg dispersible
  tablets, 3 for liquids). An ARCOS replay therefore finds them. Liquids are
  counted in mL (units_per_package = mL per package, base mg per mL): ARCOS
  leaves their DOSAGE_UNIT empty; the package volume comes from base weight /
  concentration.
* **Other families**: labeler codes are real (Purdue 59011, SpecGx 0406,
  KVK 10702, Rhodes 42858, Hikma 0054/0641, Janssen 50458, Teva 0093,
  Hospira 0409, ...); product codes are plausible, not checked against FDA's
  NDC directory. Package sizes are typical (100-count bottles, 500-count for
  high-volume generics, 5 patches, vials in mL).
* ``base_mg_per_unit``: labeled strength times an approximate salt-to-base
  ratio (molecular weights): oxycodone HCl 0.896, hydrocodone bitartrate
  hemipentahydrate 0.605, morphine sulfate pentahydrate 0.752, hydromorphone
  HCl 0.887, oxymorphone HCl 0.892, tapentadol HCl 0.859, codeine phosphate
  0.737 / codeine sulfate 0.797, methylphenidate HCl 0.865, mixed amphetamine
  salts 0.625, lisdexamfetamine dimesylate 0.578, zolpidem tartrate 0.804,
  tramadol HCl 0.878, testosterone cypionate 0.699. Products labeled as base
  (buprenorphine, fentanyl, ketamine, benzodiazepines, pregabalin) use 1.0.
  Fentanyl patches: base mg per patch is the drug content (0.168 mg per
  mcg/h of delivery rate, Duragesic labeling: 25 mcg/h = 4.2 mg).
* ``mme_factor``: CDC (2016) oral MME factors, applied to base mg as the
  ARCOS sample does: oxycodone 1.5, hydrocodone 1, morphine 1,
  hydromorphone 4, oxymorphone 3, tapentadol 0.4, codeine 0.15, tramadol 0.1,
  methadone per the sample. Fentanyl patch: CDC 2.4 MME/day per mcg/h x 3 days
  per patch / 0.168 mg per mcg/h = 42.857 per mg of content. Parenteral forms
  are *not* converted to oral equivalents (morphine inj 1, hydromorphone inj 4,
  fentanyl citrate inj 100 = 0.1 mg IV fentanyl ~ 10 mg morphine): good
  enough to rank orders, not for clinical use. Buprenorphine is 0 (CDC: no
  MME for buprenorphine products used for opioid use disorder); non-opioids 0.

Schedules change over time (DEA reschedules products). The master's
``schedule`` column is the schedule in force now; ``schedule_changes.csv``
next to it lists the earlier ones by date, and every lookup for a date
(ARCOS replay, evaluation, the verifier with the order's signing date) uses
:meth:`streams.domain.products.ProductMaster.schedule`:

* hydrocodone combination products (hydrocodone with acetaminophen,
  ibuprofen, aspirin, homatropine, guaifenesin, chlorpheniramine,
  pseudoephedrine...) were schedule III until 2014-10-06 and II from that day
  (79 FR 49661, effective 2014-10-06). Single-entity hydrocodone was always II.

Run ``python -m streams.tools.product_catalog [path]`` to rewrite the CSV (and
the schedule changes next to it).
"""
from __future__ import annotations

import sys
from pathlib import Path

from streams.domain.identifiers import normalize_ndc
from datetime import date

from streams.domain.products import CHANGES_FILE, Product, ProductMaster, ScheduleChange, save_schedule_changes

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "product_master.csv"

# Salt -> base ratios (documented above).
OXY = 0.8964
HYC = 0.6054
MOR = 0.7521
HYM = 0.8867
OXM = 0.8921
TAP = 0.8586
COD_P = 0.7367
COD_S = 0.7975
MPH = 0.8649
AMP = 0.625
LDX = 0.5781
ZOL = 0.8038
TRA = 0.8784
TST = 0.6990
FEN_PATCH_MG_PER_MCGH = 0.168
FEN_PATCH_MME = 2.4 * 3 / FEN_PATCH_MG_PER_MCGH  # per mg of patch content

# (NDC as published, product name, strength, family, schedule, form,
#  units per package, base mg per unit, MME factor)
_ROWS: list[tuple[str, str, str, str, str, str, int, float, float]] = [
    # --- OXYCODONE (CII) ---
    ("10702-018-01", "OXYCODONE HCL 5 MG TABLET", "5 MG", "OXYCODONE", "2", "TAB", 100, 5 * OXY, 1.5),
    ("10702-056-01", "OXYCODONE HCL 10 MG TABLET", "10 MG", "OXYCODONE", "2", "TAB", 100, 10 * OXY, 1.5),
    ("10702-009-01", "OXYCODONE HCL 30 MG TABLET", "30 MG", "OXYCODONE", "2", "TAB", 100, 30 * OXY, 1.5),
    ("0406-0552-01", "OXYCODONE HCL 5 MG TABLET", "5 MG", "OXYCODONE", "2", "TAB", 100, 5 * OXY, 1.5),
    ("0406-0512-05", "OXYCODONE AND ACETAMINOPHEN 5 MG/325 MG TABLET", "5 MG/325 MG", "OXYCODONE", "2", "TAB", 500, 5 * OXY, 1.5),
    ("0406-0523-01", "OXYCODONE AND ACETAMINOPHEN 10 MG/325 MG TABLET", "10 MG/325 MG", "OXYCODONE", "2", "TAB", 100, 10 * OXY, 1.5),
    ("59011-410-10", "OXYCONTIN 10 MG EXTENDED-RELEASE TABLET", "10 MG", "OXYCODONE", "2", "TAB", 100, 10 * OXY, 1.5),
    ("59011-420-10", "OXYCONTIN 20 MG EXTENDED-RELEASE TABLET", "20 MG", "OXYCODONE", "2", "TAB", 100, 20 * OXY, 1.5),
    ("59011-440-10", "OXYCONTIN 40 MG EXTENDED-RELEASE TABLET", "40 MG", "OXYCODONE", "2", "TAB", 100, 40 * OXY, 1.5),
    # --- HYDROCODONE (combinations: CIII until 2014-10-06, CII since; see SCHEDULE_CHANGES) ---
    ("0406-0365-05", "HYDROCODONE BITARTRATE AND ACETAMINOPHEN 5 MG/325 MG TABLET", "5 MG/325 MG", "HYDROCODONE", "2", "TAB", 500, 5 * HYC, 1.0),
    ("0406-0367-01", "HYDROCODONE BITARTRATE AND ACETAMINOPHEN 10 MG/325 MG TABLET", "10 MG/325 MG", "HYDROCODONE", "2", "TAB", 100, 10 * HYC, 1.0),
    ("0591-0853-05", "HYDROCODONE BITARTRATE AND ACETAMINOPHEN 10 MG/325 MG TABLET", "10 MG/325 MG", "HYDROCODONE", "2", "TAB", 500, 10 * HYC, 1.0),
    ("0591-0349-05", "HYDROCODONE BITARTRATE AND ACETAMINOPHEN 7.5 MG/325 MG TABLET", "7.5 MG/325 MG", "HYDROCODONE", "2", "TAB", 500, 7.5 * HYC, 1.0),
    # --- MORPHINE (CII) ---
    ("42858-801-01", "MORPHINE SULFATE 15 MG EXTENDED-RELEASE TABLET", "15 MG", "MORPHINE", "2", "TAB", 100, 15 * MOR, 1.0),
    ("42858-802-01", "MORPHINE SULFATE 30 MG EXTENDED-RELEASE TABLET", "30 MG", "MORPHINE", "2", "TAB", 100, 30 * MOR, 1.0),
    ("0054-0235-25", "MORPHINE SULFATE 15 MG TABLET", "15 MG", "MORPHINE", "2", "TAB", 100, 15 * MOR, 1.0),
    ("0409-1890-01", "MORPHINE SULFATE INJECTION 4 MG/ML 1 ML CARPUJECT X25", "4 MG/ML", "MORPHINE", "2", "INJ", 25, 4 * MOR, 1.0),
    # --- FENTANYL (CII) ---
    ("50458-091-05", "DURAGESIC 25 MCG/HR TRANSDERMAL SYSTEM", "25 MCG/HR", "FENTANYL", "2", "PATCH", 5, 25 * FEN_PATCH_MG_PER_MCGH, FEN_PATCH_MME),
    ("50458-092-05", "DURAGESIC 50 MCG/HR TRANSDERMAL SYSTEM", "50 MCG/HR", "FENTANYL", "2", "PATCH", 5, 50 * FEN_PATCH_MG_PER_MCGH, FEN_PATCH_MME),
    ("0378-9124-98", "FENTANYL 75 MCG/HR TRANSDERMAL SYSTEM", "75 MCG/HR", "FENTANYL", "2", "PATCH", 5, 75 * FEN_PATCH_MG_PER_MCGH, FEN_PATCH_MME),
    ("0641-6027-25", "FENTANYL CITRATE INJECTION 50 MCG/ML 2 ML AMPUL X25", "50 MCG/ML", "FENTANYL", "2", "INJ", 50, 0.05, 100.0),
    # --- HYDROMORPHONE (CII) ---
    ("0406-3243-01", "HYDROMORPHONE HCL 2 MG TABLET", "2 MG", "HYDROMORPHONE", "2", "TAB", 100, 2 * HYM, 4.0),
    ("0406-3244-01", "HYDROMORPHONE HCL 4 MG TABLET", "4 MG", "HYDROMORPHONE", "2", "TAB", 100, 4 * HYM, 4.0),
    ("42858-308-01", "HYDROMORPHONE HCL 8 MG TABLET", "8 MG", "HYDROMORPHONE", "2", "TAB", 100, 8 * HYM, 4.0),
    ("0409-1312-30", "HYDROMORPHONE HCL INJECTION 2 MG/ML 1 ML CARPUJECT X25", "2 MG/ML", "HYDROMORPHONE", "2", "INJ", 25, 2 * HYM, 4.0),
    # --- METHADONE (CII): the ARCOS sample's NDCs, values from the sample ---
    ("00054457125", "METHADONE HCL USP 10MG TABLET", "10 MG", "METHADONE", "2", "TAB", 100, 8.944, 4.0),
    ("00406577101", "METHADONE HYDROCHLORIDE TABLETS USP 10MG", "10 MG", "METHADONE", "2", "TAB", 100, 8.944, 4.0),
    ("00054457025", "METHADONE HCL USP 5MG TABLET", "5 MG", "METHADONE", "2", "TAB", 100, 4.472, 4.0),
    ("00406575501", "METHADONE HYDROCHLORIDE USP TABS 5MG", "5 MG", "METHADONE", "2", "TAB", 100, 4.472, 4.0),
    ("00054355563", "METHADONE HCL ORAL SOLUTION USP 5MG/5ML", "5 MG/5 ML", "METHADONE", "2", "SOL", 500, 0.8944, 3.0),
    ("00406054034", "METHADOSE 40MG DISPERSIBLE TABLET METHADONE HCL", "40 MG", "METHADONE", "2", "TAB", 100, 35.776, 8.0),
    ("00406577162", "METHADONE HYDROCHLORIDE TABLETS USP 10MG", "10 MG", "METHADONE", "2", "TAB", 100, 8.944, 4.0),
    ("00054855324", "METHADONE HCL TABLETS 5MG", "5 MG", "METHADONE", "2", "TAB", 100, 4.472, 4.0),
    ("00054855424", "METHADONE HCL TABLETS 10MG", "10 MG", "METHADONE", "2", "TAB", 100, 8.944, 4.0),
    ("00406345434", "METHADOSE 10MG METHADONE HCL TABLET", "10 MG", "METHADONE", "2", "TAB", 100, 8.944, 4.0),
    ("00406052710", "METHADOSE ORAL CONCENTRATE 10MG/ML", "10 MG/ML", "METHADONE", "2", "SOL", 1000, 8.944, 3.0),
    ("67457021720", "METHADONE HCL INJECTION 200MG/20ML (10MG/ML)", "10 MG/ML", "METHADONE", "2", "INJ", 20, 8.944, 3.0),
    ("00054355663", "METHADONE HCL ORAL SOLUTION USP 10MG/5ML", "10 MG/5 ML", "METHADONE", "2", "SOL", 500, 1.7888, 3.0),
    ("00406575562", "METHADONE HYDROCHLORIDE USP TABS 5MG", "5 MG", "METHADONE", "2", "TAB", 100, 4.472, 4.0),
    ("00406697434", "METHADOSE 5MG METHADONE HCL TABLET", "5 MG", "METHADONE", "2", "TAB", 100, 4.472, 4.0),
    ("00054355344", "METHADONE HCL ORAL CONCENTRATE USP 10MG/ML", "10 MG/ML", "METHADONE", "2", "SOL", 30, 8.944, 3.0),
    ("67877011601", "METHADONE HYDROCHLORIDE 10MG TABLET", "10 MG", "METHADONE", "2", "TAB", 100, 8.944, 4.0),
    ("00054039268", "METHADONE HCL ORAL CONCENTRATE USP 10MG/ML", "10 MG/ML", "METHADONE", "2", "SOL", 1000, 8.944, 3.0),
    ("66479053002", "METHADONE HCL INJECTION 10MG/ML 20ML VIAL", "10 MG/ML", "METHADONE", "2", "INJ", 20, 8.944, 3.0),
    ("66689089840", "METHADONE HYDROCHLORIDE 40MG TABLET", "40 MG", "METHADONE", "2", "TAB", 100, 35.776, 8.0),
    # --- OXYMORPHONE (CII) ---
    ("0115-1343-01", "OXYMORPHONE HCL 5 MG TABLET", "5 MG", "OXYMORPHONE", "2", "TAB", 100, 5 * OXM, 3.0),
    ("0115-1344-01", "OXYMORPHONE HCL 10 MG TABLET", "10 MG", "OXYMORPHONE", "2", "TAB", 100, 10 * OXM, 3.0),
    # --- TAPENTADOL (CII) ---
    ("50458-820-01", "NUCYNTA 50 MG TABLET", "50 MG", "TAPENTADOL", "2", "TAB", 100, 50 * TAP, 0.4),
    ("50458-830-01", "NUCYNTA 75 MG TABLET", "75 MG", "TAPENTADOL", "2", "TAB", 100, 75 * TAP, 0.4),
    # --- CODEINE (CII single entity, CIII combinations) ---
    ("0054-0156-25", "CODEINE SULFATE 30 MG TABLET", "30 MG", "CODEINE", "2", "TAB", 100, 30 * COD_S, 0.15),
    ("0093-0150-05", "ACETAMINOPHEN AND CODEINE PHOSPHATE 300 MG/30 MG TABLET", "300 MG/30 MG", "CODEINE", "3", "TAB", 500, 30 * COD_P, 0.15),
    ("0093-0350-01", "ACETAMINOPHEN AND CODEINE PHOSPHATE 300 MG/60 MG TABLET", "300 MG/60 MG", "CODEINE", "3", "TAB", 100, 60 * COD_P, 0.15),
    # --- BUPRENORPHINE (CIII) ---
    ("12496-1208-3", "SUBOXONE 8 MG/2 MG SUBLINGUAL FILM", "8 MG/2 MG", "BUPRENORPHINE", "3", "FILM", 30, 8.0, 0.0),
    ("0054-0189-13", "BUPRENORPHINE AND NALOXONE 8 MG/2 MG SUBLINGUAL TABLET", "8 MG/2 MG", "BUPRENORPHINE", "3", "TAB", 30, 8.0, 0.0),
    ("0054-0177-13", "BUPRENORPHINE HCL 8 MG SUBLINGUAL TABLET", "8 MG", "BUPRENORPHINE", "3", "TAB", 30, 8.0, 0.0),
    # --- AMPHETAMINE (CII non-narcotic) ---
    ("57844-120-01", "ADDERALL 20 MG TABLET", "20 MG", "AMPHETAMINE", "2N", "TAB", 100, 20 * AMP, 0.0),
    ("0555-0768-02", "DEXTROAMPHETAMINE SACCHARATE, AMPHETAMINE ASPARTATE, DEXTROAMPHETAMINE SULFATE AND AMPHETAMINE SULFATE 30 MG TABLET", "30 MG", "AMPHETAMINE", "2N", "TAB", 100, 30 * AMP, 0.0),
    ("54092-387-01", "ADDERALL XR 20 MG EXTENDED-RELEASE CAPSULE", "20 MG", "AMPHETAMINE", "2N", "CAP", 100, 20 * AMP, 0.0),
    # --- METHYLPHENIDATE (CII non-narcotic) ---
    ("0078-0440-05", "RITALIN 10 MG TABLET", "10 MG", "METHYLPHENIDATE", "2N", "TAB", 100, 10 * MPH, 0.0),
    ("50458-586-01", "CONCERTA 36 MG EXTENDED-RELEASE TABLET", "36 MG", "METHYLPHENIDATE", "2N", "TAB", 100, 36 * MPH, 0.0),
    # --- LISDEXAMFETAMINE (CII non-narcotic) ---
    ("59417-103-10", "VYVANSE 30 MG CAPSULE", "30 MG", "LISDEXAMFETAMINE", "2N", "CAP", 100, 30 * LDX, 0.0),
    ("59417-105-10", "VYVANSE 50 MG CAPSULE", "50 MG", "LISDEXAMFETAMINE", "2N", "CAP", 100, 50 * LDX, 0.0),
    # --- ALPRAZOLAM (CIV) ---
    ("0781-1077-01", "ALPRAZOLAM 0.5 MG TABLET", "0.5 MG", "ALPRAZOLAM", "4", "TAB", 100, 0.5, 0.0),
    ("0781-1079-05", "ALPRAZOLAM 1 MG TABLET", "1 MG", "ALPRAZOLAM", "4", "TAB", 500, 1.0, 0.0),
    ("0228-2039-50", "ALPRAZOLAM 2 MG TABLET", "2 MG", "ALPRAZOLAM", "4", "TAB", 500, 2.0, 0.0),
    # --- DIAZEPAM (CIV) ---
    ("0172-3926-60", "DIAZEPAM 5 MG TABLET", "5 MG", "DIAZEPAM", "4", "TAB", 100, 5.0, 0.0),
    ("0172-3927-70", "DIAZEPAM 10 MG TABLET", "10 MG", "DIAZEPAM", "4", "TAB", 500, 10.0, 0.0),
    # --- LORAZEPAM (CIV) ---
    ("0591-0240-01", "LORAZEPAM 0.5 MG TABLET", "0.5 MG", "LORAZEPAM", "4", "TAB", 100, 0.5, 0.0),
    ("0591-0241-05", "LORAZEPAM 1 MG TABLET", "1 MG", "LORAZEPAM", "4", "TAB", 500, 1.0, 0.0),
    ("0641-6044-25", "LORAZEPAM INJECTION 2 MG/ML 1 ML VIAL X25", "2 MG/ML", "LORAZEPAM", "4", "INJ", 25, 2.0, 0.0),
    # --- ZOLPIDEM (CIV) ---
    ("0093-0074-01", "ZOLPIDEM TARTRATE 10 MG TABLET", "10 MG", "ZOLPIDEM", "4", "TAB", 100, 10 * ZOL, 0.0),
    ("0024-5421-31", "AMBIEN 10 MG TABLET", "10 MG", "ZOLPIDEM", "4", "TAB", 100, 10 * ZOL, 0.0),
    # --- TRAMADOL (CIV) ---
    ("65162-627-50", "TRAMADOL HCL 50 MG TABLET", "50 MG", "TRAMADOL", "4", "TAB", 500, 50 * TRA, 0.1),
    ("0045-0659-60", "ULTRAM 50 MG TABLET", "50 MG", "TRAMADOL", "4", "TAB", 100, 50 * TRA, 0.1),
    # --- PREGABALIN (CV) ---
    ("0071-1015-68", "LYRICA 75 MG CAPSULE", "75 MG", "PREGABALIN", "5", "CAP", 90, 75.0, 0.0),
    ("0071-1016-68", "LYRICA 150 MG CAPSULE", "150 MG", "PREGABALIN", "5", "CAP", 90, 150.0, 0.0),
    # --- KETAMINE (CIII non-narcotic) ---
    ("0409-2051-05", "KETAMINE HCL INJECTION 50 MG/ML 10 ML VIAL X10", "50 MG/ML", "KETAMINE", "3N", "INJ", 100, 50.0, 0.0),
    ("42023-115-10", "KETALAR 100 MG/ML 5 ML VIAL X10", "100 MG/ML", "KETAMINE", "3N", "INJ", 50, 100.0, 0.0),
    # --- TESTOSTERONE (CIII non-narcotic) ---
    ("0009-0417-02", "DEPO-TESTOSTERONE 200 MG/ML 10 ML VIAL", "200 MG/ML", "TESTOSTERONE", "3N", "INJ", 10, 200 * TST, 0.0),
    ("0051-8462-33", "ANDROGEL 1.62% GEL PUMP 75 G", "20.25 MG/1.25 G", "TESTOSTERONE", "3N", "GEL", 75, 16.2, 0.0),
]


#: Hydrocodone combination products: another active ingredient named in the product name.
HYDROCODONE_COMBINATION = (r"\b(ACETAMINOPHEN|APAP|IBUPROFEN|ASPIRIN|HOMATROPINE|GUAIFENESIN|CHLORPHENIRAMINE|"
                           r"PSEUDOEPHEDRINE|PHENYLEPHRINE|CHLORPHEN|BROMPHENIRAMINE)\b|/")
#: Schedules that applied before a rescheduling (the master holds the current schedule).
SCHEDULE_CHANGES: list[ScheduleChange] = [
    ScheduleChange(schedule="3", end=date(2014, 10, 6), drug_family="HYDROCODONE",
                   product_pattern=HYDROCODONE_COMBINATION,
                   note="hydrocodone combination products: schedule III until 2014-10-06 (79 FR 49661)"),
]


def build_catalog() -> list[Product]:
    """The catalog as ``Product`` rows (NDCs normalized, floats rounded)."""
    products = []
    seen: set[str] = set()
    for ndc, name, strength, family, schedule, form, upp, base, mme in _ROWS:
        n = normalize_ndc(ndc)
        if n in seen:
            raise ValueError(f"duplicate NDC {n}")
        seen.add(n)
        products.append(Product(
            ndc=n, product_name=name, strength=strength, drug_family=family,
            schedule=schedule, dosage_form=form, units_per_package=int(upp),
            base_mg_per_unit=round(float(base), 4), mme_factor=round(float(mme), 4),
        ))
    return products


def write_product_master(path: str | Path = DEFAULT_PATH) -> Path:
    """Write the catalog as a product master CSV (``ProductMaster.save`` format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ProductMaster(build_catalog()).save(path)
    save_schedule_changes(SCHEDULE_CHANGES, path.parent / CHANGES_FILE)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = write_product_master(argv[0] if argv else DEFAULT_PATH)
    print(f"wrote {len(_ROWS)} products to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
