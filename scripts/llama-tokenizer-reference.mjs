// Writes the LLaMA-1/2 tokenizer reference of the npm package llama-tokenizer-js as one JSON
// file for the crate's tests: the 32000 vocabulary pieces in id order, the BPE merges in
// priority order, and the package's own test strings with the ids LLaMA's SentencePiece
// tokenizer gives them (BOS included).
//
// usage: node scripts/llama-tokenizer-reference.mjs PACKAGE_DIR OUT.json
import { writeFileSync } from 'node:fs'
import { resolve } from 'node:path'
import { pathToFileURL } from 'node:url'

const [pkgDir, out] = process.argv.slice(2)
if (!pkgDir || !out) {
  console.error('usage: node llama-tokenizer-reference.mjs PACKAGE_DIR OUT.json')
  process.exit(2)
}
const { default: tokenizer } = await import(pathToFileURL(resolve(pkgDir, 'llama-tokenizer.js')))

const tokens = tokenizer.vocabById
// `merges` maps "left right" to its priority (lower merges first).
const merges = [...tokenizer.merges.entries()]
  .sort((a, b) => a[1] - b[1])
  .map(([pair]) => {
    const space = pair.indexOf(' ')
    return [pair.slice(0, space), pair.slice(space + 1)]
  })

// The package's test cases, recorded instead of checked: its `testCase(text, ids)` calls
// become entries of `cases`; the decode-only checks are skipped.
const source = tokenizer.defaultTests.toString()
const body = source.slice(source.indexOf('{') + 1, source.lastIndexOf('}'))
  .replace('function testCase(inputString, expectedTokenIds) {',
           'function testCase(inputString, expectedTokenIds) { cases.push({ text: inputString, ids: expectedTokenIds }); return;')
  .replace('function testDecodeOnly(inputTokenIds, expectedOutputString, add_bos_token=true, add_preceding_space=true) {',
           'function testDecodeOnly() { return;')
const cases = []
new Function('tokenizer', 'cases', body)(tokenizer, cases)
if (cases.length < 10) throw new Error(`expected the package's test cases, found ${cases.length}`)
// Each recorded case must be what the package's own encoder gives.
for (const c of cases) {
  const ids = tokenizer.encode(c.text, true, true, true)
  if (ids.join(',') !== c.ids.join(',')) throw new Error(`package disagrees with its test for ${JSON.stringify(c.text)}`)
}
writeFileSync(out, JSON.stringify({ source: 'llama-tokenizer-js@1.2.2', tokens, merges, cases }))
console.log(`llama tokenizer reference: ${tokens.length} tokens, ${merges.length} merges, ${cases.length} cases`)
