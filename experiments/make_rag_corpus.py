"""Write a corpus folder and a questions file, the two inputs the rag problem takes by path, from XQuAD.

One .txt file per paragraph (``ARTICLE/NN.txt``) and one JSON line per question with its gold answer
text and gold document id: the layout of a user's own document collection and question set.

    python experiments/make_rag_corpus.py --xquad ../shared/data/xquad_en/xquad.en.json \\
        --corpus my_docs --questions my_questions.jsonl [--articles 5]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--xquad", required=True, help="an XQuAD/SQuAD-format JSON file")
    parser.add_argument("--corpus", required=True, help="folder to write the documents into")
    parser.add_argument("--questions", required=True, help="JSON Lines file to write the questions into")
    parser.add_argument("--articles", type=int, help="only the first N articles (default: all)")
    args = parser.parse_args()
    articles = json.loads(Path(args.xquad).read_text(encoding="utf-8"))["data"][: args.articles]
    corpus = Path(args.corpus)
    n_docs = n_questions = 0
    Path(args.questions).parent.mkdir(parents=True, exist_ok=True)
    with open(args.questions, "w", encoding="utf-8") as out:
        for article in articles:
            folder = re.sub(r"\W+", "_", article.get("title", "article")).strip("_") or "article"
            (corpus / folder).mkdir(parents=True, exist_ok=True)
            for i, paragraph in enumerate(article["paragraphs"]):
                doc_id = f"{folder}/{i:02d}.txt"
                (corpus / doc_id).write_text(paragraph["context"], encoding="utf-8")
                n_docs += 1
                for qa in paragraph["qas"]:
                    out.write(json.dumps({"question": qa["question"], "answer": qa["answers"][0]["text"], "doc_id": doc_id}) + "\n")
                    n_questions += 1
    print(f"wrote {n_docs} documents under {corpus} and {n_questions} questions to {args.questions}")


if __name__ == "__main__":
    main()
