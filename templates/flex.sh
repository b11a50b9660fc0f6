#!/usr/bin/env bash
# Build the dicom-etl image and its six Dataflow flex templates, or run one of them.
#
#   templates/flex.sh build
#   templates/flex.sh run import_dicom 'input=gs://landing/2026-11-23/**.dcm' 'store=gs://archive/store'
#   templates/flex.sh run import_dicom --max-workers=8 --worker-machine-type=n1-standard-4 'input=...' ...
#
# Settings, from the environment:
#   PROJECT, REGION   the Google Cloud project and the Dataflow region
#   BUCKET            gs://bucket[/prefix] for the template specs (templates/), staging/ and tmp/
#   REPOSITORY        optional; the image's name without a tag, default
#                     REGION-docker.pkg.dev/PROJECT/dicom-etl/dicom-etl (the Artifact Registry
#                     repository must exist; `gcloud auth configure-docker REGION-docker.pkg.dev` to push)
#   IMAGE             optional; build: default REPOSITORY:COMMIT, the checkout's commit (12 hex digits);
#                     run: default the image of the template spec, the one it was built with
#   JOB_NAME          optional, for run; default the pipeline's name and the time
#
# `build` tags the image with the commit it is built from, so a tag always names the same code: it
# refuses a checkout whose image files differ from the commit (commit first), builds for linux/amd64
# (Dataflow's workers), and builds and pushes nothing when the registry has that tag already. It ends
# with the image's name: give it to the Airflow DAG (`dicom_etl_image`) as the workers' image.
# `run` submits the job and returns: gcloud prints the job's id and state, nothing waits for the job.
# Its name=value arguments are the template's parameters; those starting with -- are flags of
# `gcloud dataflow flex-template run` (the job's workers: --max-workers, --num-workers,
# --worker-machine-type, --additional-experiments, ...), passed on as they are.
set -euo pipefail
cd "$(dirname "$0")/.."

PIPELINES="import_dicom export_dicom export_metadata delete_dicom deidentify_dicom import_images"
# What goes into the image and the template specs.
IMAGE_FILES="pyproject.toml setup.py README.md pipelines transforms storage dicomlib schemas templates/launch.py
  templates/Dockerfile templates/Dockerfile.dockerignore templates/*/metadata.json"
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET to gs://bucket}"
REPOSITORY=${REPOSITORY:-$REGION-docker.pkg.dev/$PROJECT/dicom-etl/dicom-etl}
BUCKET=${BUCKET%/}

commit_tag() {
  # shellcheck disable=SC2086 # IMAGE_FILES is a list of paths and globs
  if [ -n "$(git status --porcelain --untracked-files=all -- $IMAGE_FILES)" ]; then
    echo "the checkout differs from its commit in files of the image; commit them first:" >&2
    # shellcheck disable=SC2086
    git status --short --untracked-files=all -- $IMAGE_FILES >&2
    exit 1
  fi
  git rev-parse --short=12 HEAD
}

build() {
  local image tag
  if [ -n "${IMAGE:-}" ]; then
    image=$IMAGE
  else
    tag=$(commit_tag)
    image=$REPOSITORY:$tag
  fi
  if docker manifest inspect "$image" >/dev/null 2>&1; then
    echo "$image is in the registry already: not rebuilt" >&2
  else
    docker build --platform linux/amd64 -f templates/Dockerfile -t "$image" .
    docker push "$image"
  fi
  for pipeline in $PIPELINES; do
    gcloud dataflow flex-template build "$BUCKET/templates/$pipeline.json" \
      --project="$PROJECT" \
      --image="$image" \
      --sdk-language=PYTHON \
      --metadata-file="templates/$pipeline/metadata.json"
  done
  echo "$image"
}

run() {
  local pipeline=${1:?usage: templates/flex.sh run PIPELINE name=value ...}
  shift
  case " $PIPELINES " in *" $pipeline "*) ;; *) echo "unknown pipeline: $pipeline" >&2; exit 2 ;; esac
  local spec="$BUCKET/templates/$pipeline.json" image
  # The workers boot from the launcher's own image: the one the template spec names.
  if [ -n "${IMAGE:-}" ]; then
    image=$IMAGE
  else
    image=$(gcloud storage cat "$spec" | python3 -c 'import json, sys; print(json.load(sys.stdin)["image"])')
  fi
  # gcloud splits --parameters at commas, which list values use (input=a,b): ^~^ makes ~ the delimiter.
  local parameters="^~^sdk_container_image=$image" flags=()
  for parameter in "$@"; do
    case $parameter in --*) flags+=("$parameter") ;; *) parameters+="~$parameter" ;; esac
  done
  gcloud dataflow flex-template run "${JOB_NAME:-${pipeline//_/-}-$(date -u +%Y%m%d-%H%M%S)}" \
    --project="$PROJECT" \
    --region="$REGION" \
    --template-file-gcs-location="$spec" \
    --staging-location="$BUCKET/staging" \
    --temp-location="$BUCKET/tmp" \
    "${flags[@]}" \
    --parameters="$parameters"
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: templates/flex.sh build | run PIPELINE [--gcloud-flag=value ...] name=value ..." >&2; exit 2 ;;
esac
