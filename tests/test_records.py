"""spruce_nb.records on a CSV-labelled DICOM folder made at test time from pydicom's own sample files (never committed):
RSNA and ChestX-ray14 layouts load, patient-level splits never share a patient, bad input gives the named errors."""
import csv, shutil
from pathlib import Path
import pytest
import torch

pydicom_data = pytest.importorskip('pydicom.data', reason='pip install pydicom (a dev requirement)')
from spruce_nb.records import records_from_csv, patient_split, RecordsDataset, open_dataset, is_records_spec

@pytest.fixture(scope='module')
def dicom_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('dicom')
    src = [pydicom_data.get_testdata_file('CT_small.dcm'), pydicom_data.get_testdata_file('MR_small.dcm')]
    rows = []
    for i in range(20):                                   # RSNA: <patientId>.dcm, pneumonia patients have two box rows
        pid = f'rsna-{i:03d}'; shutil.copy(src[i % 2], d / f'{pid}.dcm')
        rows += [[pid, 10, 20, 30, 40, 1], [pid, 50, 60, 30, 40, 1]] if i % 4 == 0 else [[pid, '', '', '', '', 0]]
    with open(d / 'stage_2_train_labels.csv', 'w', newline='') as f:
        w = csv.writer(f); w.writerow(['patientId', 'x', 'y', 'width', 'height', 'Target']); w.writerows(rows)
    finds = ['Cardiomegaly', 'No Finding', 'No Finding', 'Effusion', 'Cardiomegaly|Effusion', 'No Finding']
    rows = []
    for i in range(36):                                   # ChestX-ray14: 12 patients with 3 visits each
        pid = f'{i // 3:08d}'; fn = f'{pid}_{i % 3:03d}.dcm'; shutil.copy(src[i % 2], d / fn)
        rows.append([fn, finds[i % 6], i % 3, pid])
    with open(d / 'Data_Entry_2017.csv', 'w', newline='') as f:
        w = csv.writer(f); w.writerow(['Image Index', 'Finding Labels', 'Follow-up #', 'Patient ID']); w.writerows(rows)
    return d

def _no_overlap(parts):
    owners = [set(p.patients) for p in parts]
    return all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])

def test_rsna_layout_loads_one_label_per_patient(dicom_dir):
    rec = records_from_csv(dicom_dir / 'stage_2_train_labels.csv', layout='rsna')
    assert rec.counts() == {'normal': 15, 'pneumonia': 5} and rec.report['boxes_beyond_first'] == 5
    parts = [RecordsDataset(rec, s, size=32) for s in ('train', 'val', 'test')]
    assert sum(map(len, parts)) == 20 and _no_overlap(parts)
    x, y = parts[0][0]
    assert x.shape == (3, 32, 32) and -1 <= float(x.min()) and float(x.max()) <= 1 and y in (0, 1)
    assert {int(l) for p in parts for l in p.labels} == {0, 1}

def test_nih_layout_task_and_patient_split(dicom_dir):
    spec = f'csv:{dicom_dir}/Data_Entry_2017.csv@layout=nih,positive=Cardiomegaly,negative=No Finding'
    assert is_records_spec(spec)
    parts = [open_dataset(spec, s, size=32, seed=1) for s in ('train', 'val', 'test')]
    assert _no_overlap(parts) and sum(map(len, parts)) == 30           # 6 images with Effusion only are excluded
    assert parts[0].classes == ('No Finding', 'Cardiomegaly')
    rec = records_from_csv(dicom_dir / 'Data_Entry_2017.csv', layout='nih', positive='Cardiomegaly')
    assert rec.report['excluded_other_findings'] == 6
    assert len(rec.one_per_patient()) == len(set(rec.patients)) == 12
    assert patient_split(rec.patients, rec.labels, seed=3) == patient_split(rec.patients, rec.labels, seed=3)

@pytest.mark.parametrize('content, kw, msg', [
    ('Image Index,Finding Labels,Patient ID\n00000000_000.dcm,Cardiomegally,0\n', dict(layout='nih', positive='Cardiomegaly'), "unknown label(s) in column 'Finding Labels'"),
    ('patientId,Target\nrsna-000,3\n', dict(layout='rsna'), "'3' (row 2)"),
    ('patientId,x,y\nrsna-000,1,2\n', dict(layout='rsna'), "column(s) ['Target'] missing for layout 'rsna', which expects ['patientId', 'Target']"),
    ('file,label\nnothere.dcm,a\n', dict(layout='generic'), "['patient'] missing"),
    ('Image Index,Finding Labels,Patient ID\n' + ''.join(f'lost{i}.dcm,No Finding,{i}\n' for i in range(9)), dict(layout='nih', positive='Cardiomegaly'),
     '9 of 9 image files listed'),
    ('patientId,Target\nrsna-000,0\nrsna-000,1\n', dict(layout='rsna'), 'has rows with Target 0 and 1'),
])
def test_bad_csv_named_errors(dicom_dir, tmp_path, content, kw, msg):
    p = tmp_path / 'labels.csv'; p.write_text(content)
    with pytest.raises(ValueError, match=None) as e: records_from_csv(p, image_dir=dicom_dir, **kw)
    assert msg in str(e.value), str(e.value)

def test_dicom_without_pixels_named(dicom_dir, tmp_path):
    shutil.copy(pydicom_data.get_testdata_file('rtplan.dcm'), tmp_path / 'rsna-000.dcm')
    (tmp_path / 'labels.csv').write_text('patientId,Target\nrsna-000,0\n')
    ds = open_dataset(f'csv:{tmp_path}/labels.csv@layout=rsna', None, size=32)
    with pytest.raises(ValueError, match='no pixel data') as e: ds[0]
    assert 'rsna-000.dcm' in str(e.value)
