//! Sample HL7 messages for the demo and benchmarks: realistic shapes, made-up people.

/// A lab result (ORU^R01) of about 1 KB with control id `control_id`.
pub fn lab_result(control_id: &str, patient_number: usize) -> Vec<u8> {
    format!(
        "MSH|^~\\&|LAB|CITYLAB|OUTPOST|SMITHPEDS|20261123101500||ORU^R01^ORU_R01|{control_id}|P|2.5.1\r\
PID|1||MRN{patient_number:06}^^^SMITHPEDS^MR||DOE^JANE^Q||20150412|F|||12 ELM ST^^SPRINGFIELD^IL^62701||555-0100\r\
PV1|1|O|PEDS^^^SMITHPEDS||||1234^WELBY^MARCUS\r\
ORC|RE|ORD{patient_number}|FIL{patient_number}\r\
OBR|1|ORD{patient_number}|FIL{patient_number}|57021-8^CBC W Auto Differential panel^LN|||20261123091000\r\
OBX|1|NM|6690-2^Leukocytes^LN||7.2|10*3/uL|4.5-13.5|N|||F\r\
OBX|2|NM|789-8^Erythrocytes^LN||4.6|10*6/uL|4.0-5.2|N|||F\r\
OBX|3|NM|718-7^Hemoglobin^LN||12.9|g/dL|11.5-15.5|N|||F\r\
OBX|4|NM|4544-3^Hematocrit^LN||38.1|%|35-45|N|||F\r\
OBX|5|NM|777-3^Platelets^LN||310|10*3/uL|150-450|N|||F\r\
NTE|1||Specimen received in good condition \\T\\ processed within 2 hours.\r"
    )
    .into_bytes()
}

/// An admission (ADT^A01).
pub fn admission(control_id: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|PMS|SMITHPEDS|OUTPOST|SMITHPEDS|20261123101600||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r\
EVN|A01|20261123101600\r\
PID|1||MRN000777^^^SMITHPEDS^MR||ROE^RICHARD||20180101|M\r\
PV1|1|O|PEDS\r"
    )
    .into_bytes()
}

/// A lab order (ORM^O01).
pub fn order(control_id: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|PMS|SMITHPEDS|LAB|CITYLAB|20261123101700||ORM^O01|{control_id}|P|2.3\r\
PID|1||MRN000778^^^SMITHPEDS^MR||POE^EDGAR||20160303|M\r\
ORC|NW|ORD778\r\
OBR|1|ORD778||2345-7^Glucose^LN\r"
    )
    .into_bytes()
}
