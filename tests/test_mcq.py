"""Multiple-choice benchmarks load in the shapes they are published in; a shape medcot cannot read is refused with
the columns it found and the setting to use. The rows below are written for these tests in each benchmark's shape."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medcot.config import ConfigError, McqSourceConfig, load_config
from medcot.data import DataError
from medcot.evaluate import mcq_items
from medcot.mcq import read_mcq

# MedQA-USMLE as jind11/MedQA and GBaker/MedQA-USMLE-4-options publish it: `answer` is the option's text.
MEDQA = [
    {"question": "A 34-year-old woman has fatigue and spoon-shaped nails; her MCV is 68 fL. Most likely cause?",
     "answer": "Iron deficiency", "options": {"A": "Folate deficiency", "B": "Iron deficiency",
                                              "C": "Vitamin B12 deficiency", "D": "Hemolysis"},
     "meta_info": "step1", "answer_idx": "B", "metamap_phrases": ["fatigue", "spoon-shaped nails"]},
    {"question": "A 60-year-old man has crushing chest pain and ST elevation in II, III and aVF. Occluded artery?",
     "answer": "Right coronary artery", "options": {"A": "Left anterior descending artery", "B": "Left circumflex artery",
                                                    "C": "Left main coronary artery", "D": "Right coronary artery"},
     "meta_info": "step2&3", "answer_idx": "D", "metamap_phrases": ["chest pain"]},
]
# MedMCQA as openlifescienceai/medmcqa publishes it: `cop` indexes opa..opd from 0.
MEDMCQA = [
    {"id": "m-1", "question": "Drug of choice for anaphylaxis?", "opa": "Adrenaline", "opb": "Atropine",
     "opc": "Hydrocortisone", "opd": "Chlorpheniramine", "cop": 0, "choice_type": "single", "exp": "Adrenaline first.",
     "subject_name": "Pharmacology", "topic_name": "Autonomic"},
    {"id": "m-2", "question": "Nerve injured in a fracture of the surgical neck of the humerus?", "opa": "Radial",
     "opb": "Axillary", "opc": "Ulnar", "opd": "Median", "cop": 1, "choice_type": "single", "exp": None,
     "subject_name": "Anatomy", "topic_name": "Upper limb"},
    {"id": "m-3", "question": "Vitamin deficient in Wernicke encephalopathy?", "opa": "Vitamin B12", "opb": "Niacin",
     "opc": "Pyridoxine", "opd": "Thiamine", "cop": 3, "choice_type": "single", "exp": "",
     "subject_name": "Medicine", "topic_name": "Neurology"},
]
# PubMedQA as qiaojin/PubMedQA (pqa_labeled) publishes it.
PUBMEDQA = [
    {"pubid": 1001, "question": "Does early mobilisation shorten hospital stay after hip fracture surgery?",
     "context": {"contexts": ["Patients mobilised within 24 h were compared with later mobilisation.",
                              "Median stay was 9 vs 12 days."], "labels": ["METHODS", "RESULTS"], "meshes": ["Hip"]},
     "long_answer": "Early mobilisation was associated with a shorter stay.", "final_decision": "yes"},
    {"pubid": 1002, "question": "Is serum ferritin a reliable marker of iron stores in acute inflammation?",
     "context": {"contexts": ["Ferritin rises as an acute-phase reactant."], "labels": ["BACKGROUND"], "meshes": []},
     "long_answer": "Not on its own.", "final_decision": "no"},
    {"pubid": 1003, "question": "Does vitamin D supplementation prevent falls in community-dwelling adults?",
     "context": {"contexts": ["Trials disagree on the effect."], "labels": ["RESULTS"], "meshes": []},
     "long_answer": "The evidence is mixed.", "final_decision": "maybe"},
]
# MMLU's medical subjects as cais/mmlu publishes them (Parquet): `answer` indexes `choices` from 0.
MMLU = [
    {"question": "Which muscle abducts the arm from 15 to 90 degrees?", "subject": "anatomy",
     "choices": ["Supraspinatus", "Deltoid", "Teres minor", "Subscapularis"], "answer": 1},
    {"question": "The normal adult resting heart rate range is", "subject": "clinical_knowledge",
     "choices": ["40-60 bpm", "60-100 bpm", "100-120 bpm", "120-140 bpm"], "answer": 1},
    {"question": "Which cranial nerve innervates the lateral rectus?", "subject": "anatomy",
     "choices": ["III", "IV", "V", "VI"], "answer": 3},
]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read(path, **settings):
    return read_mcq(McqSourceConfig(path=str(path), **settings))[1]


def letters(rows):
    return [r.answer for r in rows]


def test_medqa_as_published_is_read_by_its_answer_idx_not_its_answer_text(tmp_path):
    rows = read(jsonl(tmp_path / "US_test.jsonl", MEDQA))
    assert letters(rows) == ["B", "D"]
    assert rows[0].options["B"] == "Iron deficiency" and rows[0].stem == MEDQA[0]["question"]


def test_medqa_with_options_as_key_value_pairs_as_bigbio_publishes_it(tmp_path):
    bigbio = [{**r, "options": [{"key": k, "value": v} for k, v in r["options"].items()]} for r in MEDQA]
    rows = read(jsonl(tmp_path / "med_qa.jsonl", bigbio))
    assert letters(rows) == ["B", "D"] and list(rows[1].options) == ["A", "B", "C", "D"]


def test_medmcqa_options_come_from_opa_to_opd_and_cop_counts_from_zero(tmp_path):
    rows = read(jsonl(tmp_path / "medmcqa_dev.jsonl", MEDMCQA))
    assert letters(rows) == ["A", "B", "D"]
    assert rows[1].options == {"A": "Radial", "B": "Axillary", "C": "Ulnar", "D": "Median"}
    assert [r.id for r in rows] == ["m-1", "m-2", "m-3"]


def test_medmcqa_from_its_github_release_counts_cop_from_one(tmp_path):
    release = [{**r, "cop": r["cop"] + 1} for r in MEDMCQA]  # 1, 2, 4: the 4 says options count from 1
    assert letters(read(jsonl(tmp_path / "dev.jsonl", release))) == ["A", "B", "D"]


def test_medmcqa_indices_that_read_either_way_ask_for_answer_index_start(tmp_path):
    path = jsonl(tmp_path / "dev.jsonl", MEDMCQA[1:2])  # cop 1 alone: B from 0, A from 1
    with pytest.raises(DataError, match=r"dev.jsonl: the answer indices of rows 0-0 read alike .* set "
                                        r"eval.mcq\[\].answer_index_start to 0 or 1"):
        read(path)
    assert letters(read(path, answer_index_start=1)) == ["A"]


def test_medmcqa_test_split_without_answers_is_refused_with_the_split_to_use(tmp_path):
    path = jsonl(tmp_path / "test.jsonl", [{**MEDMCQA[0], "cop": -1}])
    with pytest.raises(DataError, match="test.jsonl: row 0 has no answer .*use its validation split"):
        read(path)


def test_pubmedqa_asks_yes_no_or_maybe_about_the_abstract(tmp_path):
    rows = read(jsonl(tmp_path / "pqa_labeled.jsonl", PUBMEDQA))
    assert letters(rows) == ["A", "B", "C"]
    assert rows[0].options == {"A": "yes", "B": "no", "C": "maybe"} and rows[0].id == "1001"
    assert rows[0].stem == ("Abstract: Patients mobilised within 24 h were compared with later mobilisation.\n"
                            "Median stay was 9 vs 12 days.\nQuestion: " + PUBMEDQA[0]["question"])


def test_pubmedqa_original_file_keyed_by_pmid_reads_the_same(tmp_path):
    original = {str(r["pubid"]): {"QUESTION": r["question"], "CONTEXTS": r["context"]["contexts"],
                                  "LABELS": r["context"]["labels"], "LONG_ANSWER": r["long_answer"],
                                  "final_decision": r["final_decision"]} for r in PUBMEDQA}
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps(original), encoding="utf-8")
    rows = read(path)
    assert letters(rows) == ["A", "B", "C"] and [r.id for r in rows] == ["1001", "1002", "1003"]
    assert rows == read(jsonl(tmp_path / "pqa_labeled.jsonl", PUBMEDQA))


def test_mmlu_parquet_reads_choices_and_an_answer_index_from_zero(tmp_path):
    path = tmp_path / "anatomy-test.parquet"
    pq.write_table(pa.Table.from_pylist(MMLU), path)
    rows = read(path)
    assert letters(rows) == ["B", "B", "D"] and rows[2].options["D"] == "VI"


def test_medmcqa_exported_to_csv_reads_its_cop_digits_as_indices(tmp_path):
    path = tmp_path / "medmcqa.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(MEDMCQA[0]))
        writer.writeheader()
        writer.writerows(MEDMCQA)
    assert letters(read(path)) == ["A", "B", "D"]


def test_an_answer_given_as_an_options_text_reads_as_its_letter(tmp_path):
    rows = [{"question": "Q1?", "options": {"A": "Aspirin", "B": "Heparin"}, "answer": "  heparin "},
            {"question": "Q2?", "options": ["Warfarin", "Alteplase"], "answer": "A"}]
    assert letters(read(jsonl(tmp_path / "own.jsonl", rows))) == ["B", "A"]


def test_an_answer_text_that_matches_two_options_is_refused(tmp_path):
    rows = [{"question": "Q?", "options": {"A": "Aspirin", "B": "aspirin", "C": "Heparin"}, "answer": "Aspirin"}]
    with pytest.raises(DataError, match="own.jsonl: row 0: answer 'Aspirin' is the text of options A and B"):
        read(jsonl(tmp_path / "own.jsonl", rows))


def test_the_issues_medqa_file_read_through_its_answer_text_column_still_works(tmp_path):
    """answer_column: answer (the text) reads what answer_idx says: the option whose text it is."""
    rows = read(jsonl(tmp_path / "US_test.jsonl", MEDQA), answer_column="answer")
    assert letters(rows) == ["B", "D"]


def test_columns_that_fit_two_formats_are_refused_naming_them_and_the_setting(tmp_path):
    rows = [{"question": "Q?", "options": {"A": "x", "B": "y"}, "choices": ["x", "y"], "answer": "A"}]
    with pytest.raises(DataError, match=r"two.jsonl: the columns \(answer, choices, options, question\) fit more than "
                                        r"one published format \(mmlu, columns\); set eval.mcq\[\].format"):
        read(jsonl(tmp_path / "two.jsonl", rows))
    assert letters(read(tmp_path / "two.jsonl", format="columns")) == ["A"]


def test_a_named_format_that_the_rows_do_not_have_names_the_missing_column(tmp_path):
    with pytest.raises(DataError, match=r"US_test.jsonl: row 0 has no 'opa' column \(format medmcqa; columns present: "
                                        r"answer, answer_idx, meta_info"):
        read(jsonl(tmp_path / "US_test.jsonl", MEDQA), format="medmcqa")


def test_column_keys_beside_a_named_format_are_refused_by_the_config():
    with pytest.raises(ConfigError, match="eval.mcq.0: .*answer_column apply to format 'columns', not 'medqa'"):
        load_config(None, ["eval.mcq=[{path: x.jsonl, format: medqa, answer_column: answer}]"])


def test_each_format_becomes_lettered_prompts_with_the_correct_choice(tmp_path):
    items = mcq_items(McqSourceConfig(path=jsonl(tmp_path / "medmcqa_dev.jsonl", MEDMCQA)))
    assert [i.source for i in items] == ["mcq:medmcqa_dev"] * 3 and items[0].id == "mcq:medmcqa_dev:m-1"
    assert items[0].question == ("Drug of choice for anaphylaxis?\n\nA. Adrenaline\nB. Atropine\nC. Hydrocortisone\n"
                                 "D. Chlorpheniramine\n\nAnswer with the letter of the correct option.")
    assert items[0].correct_choice == "A"
