"""Every relative link of README.md and docs/*.md leads somewhere: to a file or folder of the repository, and, with a
`#anchor`, to a heading of that page (GitHub's slug of the heading)."""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT/'README.md', *sorted((ROOT/'docs').glob('*.md'))]
FENCE = re.compile(r'^ *```.*?^ *```', flags=re.M | re.S)
CODE = re.compile(r'`[^`\n]*`')
LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')


def slug(heading: str) -> str:
    "GitHub's anchor of a heading: its text without markup, lower case, without punctuation, spaces as hyphens"
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link's text stays, its target goes
    text = text.replace('`', '').replace('*', '').strip().lower()
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(page: Path) -> set[str]:
    "The anchors GitHub gives the headings of `page`: a repeated slug gets -1, -2, ..."
    seen, result = {}, set()
    for line in FENCE.sub('', page.read_text(encoding='utf-8')).splitlines():
        if not (match := re.match(r'#{1,6} +(.+?) *#* *$', line)): continue
        base = slug(match.group(1))
        result.add(f'{base}-{seen[base]}' if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return result


def links(page: Path) -> list[str]:
    "The targets of the links and images of `page`, outside code blocks and code spans"
    return LINK.findall(CODE.sub('', FENCE.sub('', page.read_text(encoding='utf-8'))))


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    "The relative links of `page` that lead to no file or folder under `root`, or to no heading of their page"
    broken = []
    for target in links(page):
        if re.match(r'[a-z][a-z0-9+.-]*:', target, flags=re.I): continue  # https:, mailto: ...: not ours to check
        path, _, anchor = target.partition('#')
        dest = (page.parent/unquote(path)).resolve() if path else page
        if not dest.is_relative_to(root.resolve()) or not dest.exists():
            broken.append(f'{target}: no such file in the repository')
        elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
            broken.append(f'{target}: no heading of {dest.name} has the anchor #{anchor}')
    return broken


@pytest.mark.parametrize('page', PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    assert not broken_links(page), f'{page.relative_to(ROOT)} has broken links:\n' + '\n'.join(broken_links(page))


def test_the_readme_links_every_docs_page():
    readme = set(links(ROOT/'README.md'))
    index = set(links(ROOT/'docs'/'index.md'))
    pages = {page.name for page in PAGES[1:]}
    assert pages - {'index.md'} <= {target.partition('#')[0] for target in index}, 'docs/index.md misses a page'
    assert 'docs/index.md' in readme


@pytest.mark.parametrize('heading,anchor', [
    ('Choosing on your own data: `kd_find`', 'choosing-on-your-own-data-kd_find'),
    ('Teacher forwards: one per step, plus one check', 'teacher-forwards-one-per-step-plus-one-check'),
    ('The [GTSRB](https://benchmark.ini.rub.de) workflow', 'the-gtsrb-workflow'),
    ('Multi-label (`BCEWithLogitsLossFlat`)', 'multi-label-bcewithlogitslossflat')])
def test_anchors_follow_githubs_slugs(heading, anchor):
    assert slug(heading) == anchor


def test_a_broken_link_is_reported(tmp_path):
    "The checker itself: a missing file, a missing heading, a link out of the repository; code and URLs left alone"
    (tmp_path/'docs').mkdir()
    (tmp_path/'docs'/'other.md').write_text('# Other\n\n## A part\n\n## A part\n')
    page = tmp_path/'docs'/'page.md'
    page.write_text('# Page\n\n[ok](other.md#a-part-1) [ok](#page) [ok](other.md) [url](https://example.org/x.md)\n'
                    '[missing](gone.md) [bad anchor](other.md#b-part) ![image](../img.png) [out](../../elsewhere.md)\n'
                    '`[code](gone.md)`\n\n```python\nx = "[code](gone.md)"\n```\n')
    assert broken_links(page, root=tmp_path) == [
        'gone.md: no such file in the repository', 'other.md#b-part: no heading of other.md has the anchor #b-part',
        '../img.png: no such file in the repository', '../../elsewhere.md: no such file in the repository']
